"""Public API: `lpreg_token_stats` and `lpreg_kl` (docs/spec.md §1, §2 and §4).

Both read the logits once per pass, never materialise a probability tensor, and return fp32
per-token statistics whose gradients (docs/spec.md §2) come from one fused backward pass.

Layers: this module (validation, reshapes) -> the `lpreg::token_stats` custom op in
lpreg._token_stats_ops -> the backend resolved by lpreg._contract: Triton (lpreg.kernels.token_stats),
PyTorch (lpreg._token_stats_torch_backend) or the compiled extension (lpreg._native -> csrc/).
"""

import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

from torch import Tensor

from . import _validate, _vocab_parallel
from ._rows import as_rows
from ._token_stats_ops import ShardedTokenStats, token_stats_op

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class TokenStats(NamedTuple):
    """Per-token statistics, each (...) fp32."""

    logp: Tensor  # log p(label); differentiable
    proxy_logp: Tensor  # log q(label), -inf when the label was filtered out; a target, no gradient
    kl: Tensor  # D_KL(q || p) over the full vocabulary; differentiable
    entropy: Tensor  # H(p); differentiable


def _run(logits: Tensor, labels: Optional[Tensor], temperature: float, mode: str, threshold: float,
         proxy_logits: Optional[Tensor], ignore_index: int, backend: str,
         process_group: Optional["ProcessGroup"] = None, logit_scale: float = 1.0,
         logit_softcap: Optional[float] = None) -> Tuple[Tensor, ...]:
    sharded = process_group is not None
    if sharded:
        _vocab_parallel.check_group(process_group)
    _validate.check_logits(logits, allow_empty=sharded)  # a vocabulary shard may be empty
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    _validate.check_backend(backend)
    logit_scale = _validate.check_logit_scale(logit_scale)
    logit_softcap = _validate.check_logit_softcap(logit_softcap)
    _validate.check_proxy_logits(proxy_logits, logits, allow_empty=sharded)
    if labels is not None:
        _validate.check_labels(labels, logits, ignore_index)
    x = as_rows(logits)
    proxy = None if proxy_logits is None else as_rows(proxy_logits.detach())
    lab = None if labels is None else labels.reshape(-1).long()
    args = (x, lab, proxy, 1.0 / temperature, mode == "fixed", math.log(threshold), int(ignore_index), backend,
            logit_scale, logit_softcap)
    return ShardedTokenStats.apply(*args, process_group) if sharded else token_stats_op(*args)


def lpreg_token_stats(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    proxy_logits: Optional[Tensor] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group: Optional["ProcessGroup"] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> TokenStats:
    """Fused Lp-Reg statistics of the sampled tokens.

    logits: (..., V) float32 / bfloat16 / float16, may require grad.
    labels: (...) integer sampled tokens; `ignore_index` rows give zeros and no gradient.
    temperature: T > 0; every probability is of logits / T.
    mode, threshold: the proxy's noise filter: "min_p" keeps p_i >= threshold * max p
        (threshold in (0, 1]); "fixed" keeps p_i >= threshold (in (0, 1)), or the argmax alone.
    proxy_logits: (..., V) dense logits of the data-generating policy (off-policy); default:
        the current logits, detached. The proxy is a target and carries no gradient.
    backend: "auto" | "triton" | "torch" | "cpu" | "cuda".
    process_group: None, or the torch.distributed group over which the vocabulary is sharded
        (tensor parallelism): logits (and proxy_logits) are then this rank's (..., V_r) block of
        columns [r W, r W + V_r) (W: rank 0's width; the last block may be narrower, as
        torch.chunk makes them), labels are global columns, and every other input is the same on
        every rank. Two all_gathers of a few floats per row combine the rows (docs/spec.md §6);
        every rank gets the same statistics, and the backward gives this shard's gradient with
        no further collective.
    logit_scale, logit_softcap: the LM head's logit transform (lpreg.LogitTransform), applied to the
        raw `logits` and `proxy_logits` before the temperature: z = logit_softcap * tanh(logit_scale
        * x / logit_softcap), or z = logit_scale * x when logit_softcap is None; every statistic is
        of z / T and the gradient is w.r.t. the raw logits x. logit_scale finite > 0; logit_softcap
        None or finite > 0. The default is the identity.

    Returns TokenStats(logp, proxy_logp, kl, entropy), each (...) fp32.
    """
    out = _run(logits, labels, temperature, mode, threshold, proxy_logits, ignore_index, backend, process_group,
               logit_scale, logit_softcap)
    shape = logits.shape[:-1]
    return TokenStats(*(o.reshape(shape) for o in out[:4]))


def lpreg_kl(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    proxy_logits: Optional[Tensor] = None,
    reduction: str = "none",
    backend: str = "auto",
    process_group: Optional["ProcessGroup"] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Tensor:
    """Full-vocabulary D_KL(proxy || policy) per position.

    logits: (..., V); returns (...) fp32 for reduction="none", a scalar for "mean" / "sum".
    Gradient w.r.t. logits: (p - q) / T per row (times dz/dx with a logit transform).
    process_group, logit_scale, logit_softcap: as for `lpreg_token_stats` (logits are then this
    rank's vocabulary shard).
    """
    _validate.check_reduction(reduction)
    out = _run(logits, None, temperature, mode, threshold, proxy_logits, -100, backend, process_group,
               logit_scale, logit_softcap)
    kl = out[2].reshape(logits.shape[:-1])
    if reduction == "mean":
        return kl.mean()
    if reduction == "sum":
        return kl.sum()
    return kl
