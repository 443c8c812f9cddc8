"""lpreg: fused Lp-Reg (low-probability regularization) kernels, losses and an RLVR trainer.

    import lpreg
    stats = lpreg.lpreg_token_stats(logits, labels)       # logp, proxy_logp, kl, entropy
    kl = lpreg.lpreg_kl(logits, reduction="mean")         # full-vocabulary D_KL(proxy || policy)
    loss, metrics = lpreg.lpreg_policy_loss(logits, labels, advantages, None, mask)  # on-policy

Importing lpreg needs no GPU, no Triton and no compiled extension: backends load lazily.
The mathematics is in docs/spec.md; where each op's kernel, backend, test and benchmark live is
in docs/architecture.md.
"""

__version__ = "0.1.0"  # the one version source (pyproject.toml reads it statically)

from . import reference
from ._backends import BackendStatus, backends
from .diagnosis import diagnose  # light: transformers loads when it runs (docs/diagnose.md)
from .fused_linear import fused_linear_build_proxy, fused_linear_policy_loss, fused_linear_token_stats
from .logit_transform import LogitTransform, logit_transform_from_config
from .loss_config import LossConfig, LossConfigError, needs_step_selection
from .policy_loss import lpreg_policy_loss, policy_loss_from_stats
from .regularize import LossTerms, lpreg_regularize, mechanism_metrics, mechanism_sums
from .selection import SelectionThreshold, selection_threshold
from .sparse_proxy import SparseProxy, build_proxy, sparse_proxy_stats
from .token_stats import TokenStats, lpreg_kl, lpreg_token_stats

__all__ = [
    "__version__",
    # per-token statistics (one fused pass over the logits)
    "TokenStats", "lpreg_token_stats", "lpreg_kl",
    # the off-policy proxy recorded at rollout time
    "SparseProxy", "build_proxy", "sparse_proxy_stats",
    # the Lp-Reg policy loss: its options (defined once), the losses, the step-wide selection
    "LossConfig", "LossConfigError", "lpreg_policy_loss", "policy_loss_from_stats",
    "needs_step_selection", "SelectionThreshold", "selection_threshold",
    # Lp-Reg over any base objective, and the mechanism's metrics (what it acts on)
    "LossTerms", "lpreg_regularize", "mechanism_sums", "mechanism_metrics",
    # LM head + loss without materialised logits
    "fused_linear_policy_loss", "fused_linear_token_stats", "fused_linear_build_proxy",
    # the readable pure-PyTorch oracle
    "reference",
    # scaled and soft-capped LM heads (Gemma, Cohere, Granite, ...)
    "LogitTransform", "logit_transform_from_config",
    # will Lp-Reg act on my model? (the lpreg-diagnose command)
    "diagnose",
    # what this installation can run (the compiled extension, Triton), and why not
    "backends", "BackendStatus",
]
