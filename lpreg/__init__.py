"""lpreg: fused Lp-Reg (low-probability regularization) kernels, losses and an RLVR trainer.

    import lpreg
    stats = lpreg.lpreg_token_stats(logits, labels)       # logp, proxy_logp, kl, entropy
    kl = lpreg.lpreg_kl(logits, reduction="mean")         # full-vocabulary D_KL(proxy || policy)

Importing lpreg needs no GPU, no Triton and no compiled extension: backends load lazily.
"""

from . import reference
from .token_stats import TokenStats, lpreg_kl, lpreg_token_stats

__version__ = "0.1.0"

__all__ = ["TokenStats", "lpreg_kl", "lpreg_token_stats", "reference", "__version__"]

from .fused_linear import fused_linear_policy_loss
from .policy_loss import lpreg_policy_loss
from .selection import SelectionThreshold, selection_threshold
from .sparse_proxy import SparseProxy, build_proxy, sparse_proxy_stats

__all__ += ["lpreg_policy_loss", "fused_linear_policy_loss", "SelectionThreshold", "selection_threshold",
            "SparseProxy", "build_proxy", "sparse_proxy_stats"]
