"""The contract every op shares: the row-statistics layout and the fake (meta) kernels.

This module is the bottom layer of lpreg: it imports nothing of lpreg at module level, and every
other layer (public API -> op glue -> backends, the Triton kernels included) may import it. Keeping
these things here, and nowhere else, is what keeps the op layers free of import cycles: no
op's glue imports another op's glue, and no backend imports another backend.

## Row-statistics layout

The per-row state a forward hands its backward, (N, width) fp32. Read by the Triton kernels (as
constexprs, through lpreg.kernels._row_helpers), the PyTorch backends, the fake kernels and the
compiled-extension wrapper; the C++ / CUDA kernels name the same slots in csrc/row_stats.h, and
tests/test_token_stats_ops.py checks that the two agree.

    token stats,  (N, 5):  [lse, H, lse_K, cutoff, argmax_y]
    sparse proxy, (N, 2):  [lse, H]          (the first two slots of token stats)

Ignored-row invariant (every backend): a row whose label is `ignore_index` describes no
distribution. Its forward writes zero outputs and zero statistics (argmax_y = -1) without reading
its logits, and its backward writes an exact zero gradient without reading the statistics or
computing p or q: the zeros are not a softmax state, and recomputing p = exp(x - 0) from lse = 0
overflows to inf for a logit above about 88, which then turns the zero coefficients into NaN.

The backend table (which module serves which op for which backend name, and how `backend=` is
resolved) is one layer up, in lpreg._backends: it loads the backend modules, so it must not live in
the layer they import.
"""

from typing import Optional

import torch
from torch import Tensor

# ---------------------------------------------------------------------------- row-statistics layout

LSE = 0  # logsumexp(x), x = z / T
ENTROPY = 1  # H(p)
LSE_KEPT = 2  # logsumexp over the kept set K of the proxy source y
CUTOFF = 3  # y_i >= cutoff keeps token i
ARGMAX = 4  # first argmax of y ("fixed" mode; -1 where unused), stored as fp32
TOKEN_STATS_SLOTS = ("lse", "entropy", "lse_kept", "cutoff", "argmax_y")
TOKEN_STATS_WIDTH = len(TOKEN_STATS_SLOTS)

SPARSE_PROXY_SLOTS = TOKEN_STATS_SLOTS[:2]
SPARSE_PROXY_WIDTH = len(SPARSE_PROXY_SLOTS)

NO_ARGMAX = -1  # the argmax slot of an ignored row, and of "min_p" rows

# ---------------------------------------------------------------------------- vocab-parallel row partials

# What one rank's shard of a row contributes before the ranks combine (lpreg._vocab_parallel; the
# math is docs/spec.md §6). Pass 1, (N, 7) fp32, needs nothing but the shard:
PART_MAX = 0  # m_r = max of x over the shard (-inf for an all -inf shard)
PART_SUM = 1  # s_r = sum e^(x - m_r)
PART_MOMENT = 2  # t_r = sum e^(x - m_r) (x - m_r), the entropy moment
PART_MAX_Y = 3  # max of y (= m_r on-policy)
PART_SUM_Y = 4  # sum e^(y - max y) ("fixed" mode; = s_r on-policy, 0 with a proxy in "min_p")
PART_ARGMAX_Y = 5  # first argmax of y in the shard, a local column ("fixed" mode; -1 otherwise)
PART_BAD = 6  # 1 when the shard holds a NaN or a +inf (x or y), else 0
PASS1_SLOTS = ("max", "sum", "moment", "max_y", "sum_y", "argmax_y", "bad")
PASS1_WIDTH = len(PASS1_SLOTS)
# Pass 2, (N, 2) fp32, needs the combined cutoff, max of y and argmax of every row:
PART_KEPT = 0  # sum over the shard's kept tokens of e^(y - max y)
PART_CROSS = 1  # sum over them of e^(y - max y) (y - x), +inf at x = -inf (with a proxy; 0 on-policy)
PASS2_SLOTS = ("kept", "cross")
PASS2_WIDTH = len(PASS2_SLOTS)
# An ignored row's partials: it is skipped, its combined statistics are the ignored-row zeros.
NEUTRAL_PASS1 = (float("-inf"), 0.0, 0.0, float("-inf"), 0.0, float(NO_ARGMAX), 0.0)

# ---------------------------------------------------------------------------- the logit transform

# Every op reads raw logits x and works on x' = z / T, with z = c tanh(s x / c) (soft-cap c) or
# z = s x (lpreg.logit_transform; docs/spec.md "The logit transform"). The backends fold the scale
# and the temperature into two constants:
#     x' = cap tanh(x mult / cap)   (cap = c / T > 0)       x' = x mult   (cap = 0: no soft-cap)
#     dx'/dx = mult (1 - (x' / cap)^2)                      dx'/dx = mult
# with mult = s / T. The identity transform gives mult = 1 / T exactly and cap = 0, the path and
# the bits of an op without the transform.


def transform_constants(inv_temperature: float, logit_scale: float = 1.0,
                        logit_softcap: Optional[float] = None) -> tuple[float, float]:
    """(mult, cap) of the folded transform above; logit_scale, logit_softcap already validated."""
    mult = float(inv_temperature) if logit_scale == 1.0 else float(inv_temperature) * float(logit_scale)
    cap = 0.0 if logit_softcap is None else float(logit_softcap) * float(inv_temperature)
    return mult, cap


# ---------------------------------------------------------------------------- fake (meta) kernels


def fake_row_outputs(logits: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fake forward outputs of a per-row op on (N, V) logits: four (N,) fp32 vectors (logp,
    proxy_logp, kl, entropy) and row_stats (N, width) fp32."""
    N = logits.shape[0]
    logp, proxy_logp, kl, entropy = (logits.new_empty((N,), dtype=torch.float32) for _ in range(4))
    return logp, proxy_logp, kl, entropy, logits.new_empty((N, width), dtype=torch.float32)


def fake_grad(logits: Tensor) -> Tensor:
    """Fake backward output: the gradient (N, V), contiguous, in the logits' dtype."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def keep_for_backward(ctx, inputs, output, inv_temperature: float, ignore_index: int, backend: str,
                      offset: int = 0, logit_scale: float = 1.0, logit_softcap: Optional[float] = None) -> None:
    """What a per-row op's backward reads: its tensor inputs and the forward's row_stats (output[4]),
    the scalars (the logit transform's included), and the first global column of the logits (a
    vocabulary shard's offset; 0 for whole rows). proxy_logp (output[1]) and row_stats are not differentiable."""
    ctx.save_for_backward(*inputs, output[4])
    ctx.inv_temperature, ctx.ignore_index, ctx.backend, ctx.offset = inv_temperature, ignore_index, backend, offset
    ctx.logit_scale, ctx.logit_softcap = logit_scale, logit_softcap
    ctx.mark_non_differentiable(output[1], output[4])


def as_upstream(g: Optional[Tensor]) -> Optional[Tensor]:
    """An upstream gradient as the kernels read it: fp32 and contiguous; None when the output took
    no part in the loss."""
    return None if g is None else g.float().contiguous()
