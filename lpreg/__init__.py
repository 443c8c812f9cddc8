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
