"""Fused Lp-Reg token statistics (docs/spec.md §1, §2 and §4), Triton.

Per row (one token position) with x = z/T and proxy source y = proxy/T (y = x on-policy), z the
logit transform of the raw logits (lpreg._contract.transform_constants: z = c tanh(s x_raw / c) with
a soft-cap, else s x_raw; SOFTCAP is a constexpr, so the path without one is today's):

    lse      = logsumexp(x)                    logp       = x[label] - lse
    H        = log s - t/s,  s = sum e^(x-m), t = sum e^(x-m)(x-m), m = max x      (entropy)
    K        = {i : y_i >= cutoff} U {argmax y}
               cutoff = max y + log(kappa)      (mode "min_p")
               cutoff = lse_y + log(tau)        (mode "fixed"; +inf when no token reaches tau,
                                                 so that K = {first argmax})
    lse_K    = logsumexp_{i in K}(y_i)         proxy_logp = y[label] - lse_K if label in K else -inf
    kl       = sum_K q (log q - log p) = E_q[y - x] + lse - lse_K
             = log1p(unkept / kept)             on-policy (y = x), exact and never negative

Backward, for upstream (g_logp, g_kl, g_H) per row, in one elementwise pass:

    grad_z = (g_logp (e_label - p) + g_kl (p - q) - g_H p (log p + H)) / T
    grad_raw = grad_z dz/dx_raw = grad_z s (1 - (z / c)^2)   (s alone without a soft-cap)

Row-statistics contract shared by every backend (Triton, torch, C++, CUDA): the forward
returns `row_stats`, an (N, 5) fp32 tensor [lse, H, lse_K, cutoff, argmax_y] (the layout is
defined once, in lpreg._contract), which is all the backward needs besides the logits
(and the proxy logits when given): 20 bytes per row. A row holding a NaN or a +inf (in the
logits or the proxy), or only -inf, gives NaN outputs and a NaN gradient, in that row alone.
Ignored-row invariant: a row whose label is `ignore_index` gives zero outputs and zero
row_stats, and its backward writes an exact zero gradient WITHOUT reading row_stats or
computing p: its zeros are no softmax state, and p = exp(x - 0) overflows to inf for a
logit above about 88, so that 0 * inf = NaN. Both kernels branch on the row's
validity before any arithmetic on its logits.

Limits: any V >= 1 (the loop masks the tail; offsets are int64), fp32/bf16/fp16 logits with
fp32 accumulation, rows of unit stride in the vocabulary dimension (any stride when V = 1
or N = 0).
Memory traffic: forward reads each row once (pass 1: max/lse/entropy and every block's max),
then re-reads only the blocks that can hold a kept token (pass 2: the kept-set sums, which
need the final max and cutoff): one block or two for a peaked row, all of them only for a
row that is flat within log(1/kappa). Backward reads each row once and writes the gradient
once. Compulsory traffic is therefore about 3 N V elements for forward + backward.
"""

import triton
import triton.language as tl

from .. import _contract as _layout
from ._row_helpers import (
    ARGMAX,
    CUTOFF,
    ENTROPY,
    LSE,
    LSE_KEPT,
    NO_ARGMAX,
    cross_term,
    entropy_grad,
    load_scaled,
    load_stat,
    lse_entropy,
    nan_epilogue,
    online_softmax_update,
    row_label,
    row_pointers,
    store_outputs,
    store_stat,
    transform,
    transform_slope,
    unit_stride_rows,
    upstream_coefficients,
    zero_outputs,
    zero_row,
)

ROW_STATS_WIDTH = _layout.TOKEN_STATS_WIDTH  # [lse, entropy, lse_kept, cutoff, argmax]
_WIDTH = tl.constexpr(ROW_STATS_WIDTH)
_PASS1 = tl.constexpr(_layout.PASS1_WIDTH)
_PASS2 = tl.constexpr(_layout.PASS2_WIDTH)
PART_MAX, PART_SUM, PART_MOMENT = (tl.constexpr(_layout.PART_MAX), tl.constexpr(_layout.PART_SUM),
                                   tl.constexpr(_layout.PART_MOMENT))
PART_MAX_Y, PART_SUM_Y, PART_ARGMAX_Y = (tl.constexpr(_layout.PART_MAX_Y), tl.constexpr(_layout.PART_SUM_Y),
                                         tl.constexpr(_layout.PART_ARGMAX_Y))
PART_BAD, PART_KEPT, PART_CROSS = (tl.constexpr(_layout.PART_BAD), tl.constexpr(_layout.PART_KEPT),
                                   tl.constexpr(_layout.PART_CROSS))


@triton.jit
def _row_pass1(x_row, y_row, V, inv_temperature, softcap, SOFTCAP: tl.constexpr,
               HAS_PROXY: tl.constexpr, FIXED: tl.constexpr, BLOCK_V: tl.constexpr, MAX_BLOCKS: tl.constexpr):
    """Pass 1 over a row (or a vocabulary shard of one): online max m, s = sum e^(x-m) and the
    entropy moment t = sum e^(x-m)(x-m); the proxy's max my (and, for "fixed", its sum sy and
    first argmax); NaNs in the proxy; every block's proxy max (for pass 2's block skipping)."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full((), neg_inf, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    my = tl.full((), neg_inf, tl.float32)
    sy = tl.zeros((), tl.float32)
    y_nan = tl.zeros((), tl.int32)
    # only "fixed" mode needs the argmax; in "min_p" it is always kept anyway
    argmax_y = tl.full((), NO_ARGMAX, tl.int32)
    block_ids = tl.arange(0, MAX_BLOCKS)
    block_ymax = tl.full((MAX_BLOCKS,), neg_inf, tl.float32)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        cols = b * BLOCK_V + cols0
        x = load_scaled(x_row, cols, V, inv_temperature, softcap, SOFTCAP)
        bx = tl.max(x, 0)
        m, s, t = online_softmax_update(m, s, t, x, bx)  # a NaN in x makes s NaN: the NaN test
        if HAS_PROXY:
            y = load_scaled(y_row, cols, V, inv_temperature, softcap, SOFTCAP)
            y_nan += tl.sum((y != y).to(tl.int32), 0)
            by = tl.max(y, 0)
        else:
            y = x
            by = bx
        if FIXED:
            block_arg = tl.argmax(y, 0, tie_break_left=True) + b * BLOCK_V
            argmax_y = tl.where(by > my, block_arg, argmax_y)
            if HAS_PROXY:
                my_ref = tl.where(tl.maximum(my, by) == neg_inf, 0.0, tl.maximum(my, by))
                sy = sy * tl.exp(my - my_ref) + tl.sum(tl.exp(y - my_ref), 0)
        my = tl.maximum(my, by)
        block_ymax = tl.where(block_ids == b, by, block_ymax)
    if not HAS_PROXY:
        sy = s
    return m, s, t, my, sy, y_nan, argmax_y, block_ymax


@triton.jit
def _row_pass2(x_row, y_row, V, inv_temperature, softcap, SOFTCAP: tl.constexpr, cutoff, my_ref, argmax_y,
               block_ymax, HAS_PROXY: tl.constexpr, SKIP_BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr,
               MAX_BLOCKS: tl.constexpr):
    """Pass 2: the kept-set sums relative to my_ref, kept = sum_K e^(y-my) and, with a proxy,
    cross = sum_K e^(y-my)(y-x). With SKIP_BLOCKS it re-reads only the blocks that can hold a kept
    token (block max >= cutoff, or the argmax's block): a peaked row re-reads one or two."""
    neg_inf = float("-inf")
    cols0 = tl.arange(0, BLOCK_V)
    block_ids = tl.arange(0, MAX_BLOCKS)
    argmax_block = tl.where(argmax_y >= 0, argmax_y // BLOCK_V, -1)
    kept_sum = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        if SKIP_BLOCKS:
            block_max = tl.max(tl.where(block_ids == b, block_ymax, neg_inf), 0)
            visit = (block_max >= cutoff) | (b == argmax_block)
        else:
            visit = b >= 0
        if visit:
            cols = b * BLOCK_V + cols0
            y = load_scaled(y_row, cols, V, inv_temperature, softcap, SOFTCAP)
            kept = ((y >= cutoff) | (cols == argmax_y)) & (cols < V)
            e = tl.exp(y - my_ref)
            kept_sum += tl.sum(tl.where(kept, e, 0.0), 0)
            if HAS_PROXY:
                x = load_scaled(x_row, cols, V, inv_temperature, softcap, SOFTCAP)
                cross += tl.sum(tl.where(kept, cross_term(e, y, x), 0.0), 0)  # +inf at x = -inf
    return kept_sum, cross


@triton.jit
def _token_stats_fwd_kernel(
    logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row_stats_ptr,  # outputs: (N,) x4, (N, 5)
    logits_ptr, proxy_ptr, labels_ptr,  # inputs: (N, V), (N, V) or dummy, (N,) or dummy
    V, logits_row_stride, proxy_row_stride,  # shapes / strides
    inv_temperature, softcap, log_threshold, ignore_index,  # scalars: fp32 (s / T), fp32 (c / T), fp32, int
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr, FIXED: tl.constexpr, SOFTCAP: tl.constexpr,  # features
    BLOCK_V: tl.constexpr, MAX_BLOCKS: tl.constexpr,  # tiles (MAX_BLOCKS >= cdiv(V, BLOCK_V))
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = row_pointers(logits_ptr, proxy_ptr, row, logits_row_stride, proxy_row_stride, HAS_PROXY)
    label, valid = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    neg_inf = float("-inf")

    # typed scalars: both sides of the runtime `if valid` below must agree on types; an
    # ignored row keeps these zeros (and argmax -1): the ignored-row invariant
    logp, proxy_logp, kl, entropy, lse = zero_outputs()
    lse_kept = tl.zeros((), tl.float32)
    cutoff = tl.zeros((), tl.float32)
    argmax_y = tl.full((), NO_ARGMAX, tl.int32)
    if valid:
        # ---- pass 1: max / sum / entropy moment of x; max (sum, argmax) of y; every block's max of y
        m, s, t, my, sy, y_nan, argmax_y, block_ymax = _row_pass1(
            x_row, y_row, V, inv_temperature, softcap, SOFTCAP, HAS_PROXY, FIXED, BLOCK_V, MAX_BLOCKS)
        # a NaN, or +inf (inf - inf = NaN in s), or only -inf: NaN outputs for this row alone
        bad = (s != s) | (y_nan > 0) | (m == neg_inf) | (my == neg_inf) | (m == float("inf")) | (my == float("inf"))
        lse, entropy = lse_entropy(m, s, t)
        if FIXED:
            cutoff = my + tl.log(sy) + log_threshold
            # no token reaches tau: K = {first argmax} alone
            cutoff = tl.where(my < cutoff, float("inf"), cutoff)
        else:
            cutoff = my + log_threshold
        my_ref = tl.where(bad, 0.0, my)

        # ---- pass 2: kept-set sums, re-reading only the blocks that can hold a kept token, so
        # the forward costs about one read of the logits
        kept_sum, cross = _row_pass2(x_row, y_row, V, inv_temperature, softcap, SOFTCAP, cutoff, my_ref, argmax_y,
                                     block_ymax, HAS_PROXY, True, BLOCK_V, MAX_BLOCKS)
        lse_kept = my + tl.log(kept_sum)
        if HAS_PROXY:
            kl = cross / kept_sum + lse - lse_kept
        else:
            # -log(kept mass) = log(s / kept_sum), both relative to the same max; K within
            # the row, so it is >= 0 up to rounding
            kl = tl.maximum(tl.log(s / kept_sum), 0.0)

        # ---- the sampled token
        if HAS_LABELS:
            x_label = transform(tl.load(x_row + label).to(tl.float32), inv_temperature, softcap, SOFTCAP)
            y_label = transform(tl.load(y_row + label).to(tl.float32), inv_temperature, softcap, SOFTCAP)
            logp = x_label - lse
            label_kept = (y_label >= cutoff) | (label == argmax_y)
            proxy_logp = tl.where(label_kept, y_label - lse_kept, neg_inf)
        logp, proxy_logp, kl, entropy, lse = nan_epilogue(bad, logp, proxy_logp, kl, entropy, lse)

    store_outputs(logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row, logp, proxy_logp, kl, entropy)
    store_stat(row_stats_ptr, row, _WIDTH, LSE, lse)
    store_stat(row_stats_ptr, row, _WIDTH, ENTROPY, entropy)
    store_stat(row_stats_ptr, row, _WIDTH, LSE_KEPT, lse_kept)
    store_stat(row_stats_ptr, row, _WIDTH, CUTOFF, cutoff)
    store_stat(row_stats_ptr, row, _WIDTH, ARGMAX, argmax_y.to(tl.float32))


@triton.jit
def _shard_pass1_kernel(
    part_ptr,  # output: (N, 7) fp32 partials (lpreg._contract.PASS1_SLOTS)
    logits_ptr, proxy_ptr, labels_ptr,  # inputs: (N, V) shard, (N, V) or dummy, (N,) or dummy
    V, logits_row_stride, proxy_row_stride,  # shapes / strides
    inv_temperature, softcap, ignore_index,  # scalars
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr, FIXED: tl.constexpr, SOFTCAP: tl.constexpr,  # features
    BLOCK_V: tl.constexpr, MAX_BLOCKS: tl.constexpr,  # tiles
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = row_pointers(logits_ptr, proxy_ptr, row, logits_row_stride, proxy_row_stride, HAS_PROXY)
    label, valid = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    # an ignored row keeps the neutral partials
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    my = tl.full((), float("-inf"), tl.float32)
    sy = tl.zeros((), tl.float32)
    argmax_y = tl.full((), NO_ARGMAX, tl.int32)
    bad = tl.zeros((), tl.float32)
    if valid:
        m, s, t, my, sy, y_nan, argmax_y, block_ymax = _row_pass1(
            x_row, y_row, V, inv_temperature, softcap, SOFTCAP, HAS_PROXY, FIXED, BLOCK_V, MAX_BLOCKS)
        # a NaN or a +inf in x (inf - inf = NaN in s), in y: the row has no finite softmax
        bad = ((s != s) | (y_nan > 0) | (m == float("inf")) | (my == float("inf"))).to(tl.float32)
    store_stat(part_ptr, row, _PASS1, PART_MAX, m)
    store_stat(part_ptr, row, _PASS1, PART_SUM, s)
    store_stat(part_ptr, row, _PASS1, PART_MOMENT, t)
    store_stat(part_ptr, row, _PASS1, PART_MAX_Y, my)
    store_stat(part_ptr, row, _PASS1, PART_SUM_Y, sy)
    store_stat(part_ptr, row, _PASS1, PART_ARGMAX_Y, argmax_y.to(tl.float32))
    store_stat(part_ptr, row, _PASS1, PART_BAD, bad)


@triton.jit
def _shard_pass2_kernel(
    part_ptr,  # output: (N, 2) fp32 partials (lpreg._contract.PASS2_SLOTS)
    logits_ptr, proxy_ptr, labels_ptr,  # inputs: (N, V) shard, (N, V) or dummy, (N,) or dummy
    cutoff_ptr, my_ptr, argmax_ptr,  # the rows' combined cutoff, max of y (fp32) and argmax (i64, local)
    V, logits_row_stride, proxy_row_stride,  # shapes / strides
    inv_temperature, softcap, ignore_index,  # scalars
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr,  # features
    BLOCK_V: tl.constexpr,  # tile
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = row_pointers(logits_ptr, proxy_ptr, row, logits_row_stride, proxy_row_stride, HAS_PROXY)
    label, valid = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    kept_sum = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    if valid:
        kept_sum, cross = _row_pass2(
            x_row, y_row, V, inv_temperature, softcap, SOFTCAP, tl.load(cutoff_ptr + row), tl.load(my_ptr + row),
            tl.load(argmax_ptr + row), tl.full((16,), 0.0, tl.float32), HAS_PROXY, False, BLOCK_V, 16)
    store_stat(part_ptr, row, _PASS2, PART_KEPT, kept_sum)
    store_stat(part_ptr, row, _PASS2, PART_CROSS, cross)


@triton.jit
def _token_stats_bwd_kernel(
    grad_ptr,  # output: (N, V), the logits' dtype
    logits_ptr, proxy_ptr, labels_ptr, row_stats_ptr,  # inputs
    g_logp_ptr, g_kl_ptr, g_entropy_ptr,  # upstream gradients: (N,) fp32 each, or dummies
    V, logits_row_stride, proxy_row_stride, grad_row_stride,  # shapes / strides
    inv_temperature, softcap, ignore_index, vocab_offset,  # scalars (vocab_offset: the shard's first global column)
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr,  # features
    HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,  # tile
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    g_row = grad_ptr + row * grad_row_stride
    label, valid = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if valid:
        lse = load_stat(row_stats_ptr, row, _WIDTH, LSE)
        entropy = load_stat(row_stats_ptr, row, _WIDTH, ENTROPY)
        lse_kept = load_stat(row_stats_ptr, row, _WIDTH, LSE_KEPT)
        cutoff = load_stat(row_stats_ptr, row, _WIDTH, CUTOFF)
        # the label and the argmax as columns of this shard (outside [0, V) on another shard's)
        label = label - vocab_offset
        argmax_y = load_stat(row_stats_ptr, row, _WIDTH, ARGMAX).to(tl.int64)
        argmax_y = tl.where(argmax_y >= 0, argmax_y - vocab_offset, -1)
        g_logp, g_kl, g_entropy = upstream_coefficients(
            g_logp_ptr, g_kl_ptr, g_entropy_ptr, row, inv_temperature, HAS_G_LOGP, HAS_G_KL, HAS_G_ENTROPY)
        inv_kept_mass = tl.exp(lse - lse_kept)
        cols0 = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            x = load_scaled(x_row, cols, V, inv_temperature, softcap, SOFTCAP)
            logp = x - lse
            p = tl.exp(logp)
            grad = tl.zeros((BLOCK_V,), tl.float32)
            if HAS_G_LOGP:
                grad += g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
            if HAS_G_KL:
                if HAS_PROXY:
                    y = load_scaled(proxy_ptr + row * proxy_row_stride, cols, V, inv_temperature, softcap,
                                    SOFTCAP)
                    q = tl.where((y >= cutoff) | (cols == argmax_y), tl.exp(y - lse_kept), 0.0)
                else:
                    # on-policy q = p / m on K, with 1/m = e^(lse - lse_K): no second exp
                    q = tl.where((x >= cutoff) | (cols == argmax_y), p * inv_kept_mass, 0.0)
                grad += g_kl * (p - q)
            if HAS_G_ENTROPY:
                grad -= g_entropy * entropy_grad(p, logp, entropy)  # NaN rows stay NaN through H
            if SOFTCAP:  # the chain rule through the soft-cap: dz/dx = s (1 - tanh^2), s in the coefficients
                grad *= transform_slope(x, softcap, SOFTCAP)
            tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)
    else:
        zero_row(g_row, V, BLOCK_V)  # the ignored-row invariant: no p, no row_stats read


def _block_v(V, max_block):
    return min(max_block, triton.next_power_of_2(max(V, 16)))
def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, logit_scale=1.0,
                        logit_softcap=None):
    """Launch the forward. logits/proxy: (N, V) unit-stride rows; labels: (N,) int64 or None.

    Returns (logp, proxy_logp, kl, entropy, row_stats): (N,) fp32 x4 and (N, 5) fp32.
    """
    import torch

    assert logits.dim() == 2 and unit_stride_rows(logits)  # V = 1 or N = 0: any stride
    assert proxy is None or (proxy.shape == logits.shape and unit_stride_rows(proxy))
    N, V = logits.shape
    out = [torch.empty((N,), dtype=torch.float32, device=logits.device) for _ in range(4)]
    row_stats = torch.empty((N, ROW_STATS_WIDTH), dtype=torch.float32, device=logits.device)
    if N == 0:
        return out[0], out[1], out[2], out[3], row_stats
    on_gpu = logits.is_cuda
    block_v = _block_v(V, 4096 if on_gpu else 1024)
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    _token_stats_fwd_kernel[(N,)](
        out[0], out[1], out[2], out[3], row_stats,
        logits, proxy if proxy is not None else logits, labels if labels is not None else logits,
        V, logits.stride(0), proxy.stride(0) if proxy is not None else 0,
        mult, cap, float(log_threshold), int(ignore_index),
        HAS_PROXY=proxy is not None, HAS_LABELS=labels is not None, FIXED=bool(fixed), SOFTCAP=cap > 0,
        BLOCK_V=block_v, MAX_BLOCKS=max(16, triton.next_power_of_2(triton.cdiv(V, block_v))),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return out[0], out[1], out[2], out[3], row_stats


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy,
                         inv_temperature, ignore_index, vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    """Launch the backward; g_*: (N,) fp32 or None. Returns grad_logits (N, V) in logits.dtype of
    the shard holding columns [vocab_offset, vocab_offset + V) (labels and argmax: global columns)."""
    import torch

    assert logits.dim() == 2 and unit_stride_rows(logits)  # V = 1 or N = 0: any stride
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    on_gpu = logits.is_cuda
    block_v = _block_v(V, 4096 if on_gpu else 1024)
    dummy = row_stats
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    _token_stats_bwd_kernel[(N,)](
        grad,
        logits, proxy if proxy is not None else logits, labels if labels is not None else logits, row_stats,
        g_logp if g_logp is not None else dummy, g_kl if g_kl is not None else dummy,
        g_entropy if g_entropy is not None else dummy,
        V, logits.stride(0), proxy.stride(0) if proxy is not None else 0, grad.stride(0),
        mult, cap, int(ignore_index), int(vocab_offset),
        HAS_PROXY=proxy is not None, HAS_LABELS=labels is not None, SOFTCAP=cap > 0,
        HAS_G_LOGP=g_logp is not None, HAS_G_KL=g_kl is not None, HAS_G_ENTROPY=g_entropy is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return grad


def _shard_launch(kernel, part, logits, labels, proxy, *args, **consts):
    """Launch a vocabulary-parallel pass kernel over the N rows of a shard (N, V): the common arguments;
    args: the kernel's inputs after the labels, then its three scalars (multiplier, soft-cap, ignore_index)."""
    N, V = logits.shape
    if N:
        block_v = _block_v(V, 4096 if logits.is_cuda else 1024)
        kernel[(N,)](part, logits, proxy if proxy is not None else logits, labels if labels is not None else logits,
                     *args[:-3], V, logits.stride(0), proxy.stride(0) if proxy is not None else 0, *args[-3:],
                     HAS_PROXY=proxy is not None, HAS_LABELS=labels is not None, BLOCK_V=block_v,
                     num_warps=8 if block_v >= 2048 else 4, **consts)
    return part


def token_stats_shard_pass1(logits, labels, proxy, inv_temperature, fixed, ignore_index, logit_scale=1.0,
                            logit_softcap=None):
    """The shard's pass-1 partials (N, 7) fp32 (lpreg._contract.PASS1_SLOTS): logits/proxy (N, V)
    unit-stride rows of the shard, labels (N,) int64 or None (ignored rows: the neutral partials)."""
    import torch

    assert logits.dim() == 2 and unit_stride_rows(logits)
    assert proxy is None or (proxy.shape == logits.shape and unit_stride_rows(proxy))
    part = torch.empty((logits.shape[0], _layout.PASS1_WIDTH), dtype=torch.float32, device=logits.device)
    block_v = _block_v(logits.shape[1], 4096 if logits.is_cuda else 1024)
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    return _shard_launch(_shard_pass1_kernel, part, logits, labels, proxy, mult, cap, int(ignore_index),
                         FIXED=bool(fixed), SOFTCAP=cap > 0, MAX_BLOCKS=max(16, triton.next_power_of_2(triton.cdiv(
                             logits.shape[1], block_v))))


def token_stats_shard_pass2(logits, labels, proxy, inv_temperature, cutoff, my_ref, argmax_y, ignore_index,
                            logit_scale=1.0, logit_softcap=None):
    """The shard's pass-2 partials (N, 2) fp32 (lpreg._contract.PASS2_SLOTS) given the rows' combined
    cutoff and max of y (N,) fp32 and argmax (N,) int64 (a column of this shard, -1 elsewhere)."""
    import torch

    assert logits.dim() == 2 and unit_stride_rows(logits)
    part = torch.empty((logits.shape[0], _layout.PASS2_WIDTH), dtype=torch.float32, device=logits.device)
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    return _shard_launch(_shard_pass2_kernel, part, logits, labels, proxy, cutoff.float().contiguous(),
                         my_ref.float().contiguous(), argmax_y.long().contiguous(), mult, cap,
                         int(ignore_index), SOFTCAP=cap > 0)
