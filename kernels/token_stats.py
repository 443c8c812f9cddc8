"""Fused Lp-Reg token statistics (SPEC sections 1, 2 and 4), Triton.

Per row (one token position) with x = z/T and proxy source y = proxy/T (y = x on-policy):

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

Row-statistics contract shared by every backend (Triton, torch, C++, CUDA): the forward
returns `row_stats`, an (N, 5) fp32 tensor [lse, H, lse_K, cutoff, argmax_y], which is all the
backward needs besides the logits (and the proxy logits when given): 20 bytes per row.
Rows whose label is `ignore_index` give zeros and a zero gradient. A row holding a NaN, or
only -inf, gives NaN outputs and a NaN gradient.

Limits: any V >= 1 (the loop masks the tail; offsets are int64), fp32/bf16/fp16 logits with
fp32 accumulation, rows of unit stride in the vocabulary dimension.
Memory traffic: forward reads each row once (pass 1: max/lse/entropy and every block's max),
then re-reads only the blocks that can hold a kept token (pass 2: the kept-set sums, which
need the final max and cutoff): one block or two for a peaked row, all of them only for a
row that is flat within log(1/kappa). Backward reads each row once and writes the gradient
once. Compulsory traffic is therefore about 3 N V elements for forward + backward.
"""

import triton
import triton.language as tl

ROW_STATS_WIDTH = 5  # [lse, entropy, lse_kept, cutoff, argmax]


@triton.jit
def _token_stats_fwd_kernel(
    logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row_stats_ptr,  # outputs: (N,) x4, (N, 5)
    logits_ptr, proxy_ptr, labels_ptr,  # inputs: (N, V), (N, V) or dummy, (N,) or dummy
    V, logits_row_stride, proxy_row_stride,  # shapes / strides
    inv_temperature, log_threshold, ignore_index,  # scalars: fp32, fp32, int
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr, FIXED: tl.constexpr,  # features
    BLOCK_V: tl.constexpr, MAX_BLOCKS: tl.constexpr,  # tiles (MAX_BLOCKS >= cdiv(V, BLOCK_V))
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    if HAS_PROXY:
        y_row = proxy_ptr + row * proxy_row_stride
    else:
        y_row = x_row
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    else:
        valid = row >= 0
    cols0 = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # typed scalars: both sides of the runtime `if valid` below must agree on types
    logp = tl.zeros((), tl.float32)
    proxy_logp = tl.zeros((), tl.float32)
    kl = tl.zeros((), tl.float32)
    entropy = tl.zeros((), tl.float32)
    lse = tl.zeros((), tl.float32)
    lse_kept = tl.zeros((), tl.float32)
    cutoff = tl.zeros((), tl.float32)
    # only "fixed" mode needs the argmax; in "min_p" it is always kept anyway
    argmax_y = tl.full((), -1, tl.int32)
    if valid:
        # ---- pass 1: online max m, s = sum e^(x-m), entropy moment t = sum e^(x-m)(x-m);
        # the proxy's max (and, for "fixed", its sum and first argmax); every block's proxy max
        m = tl.full((), neg_inf, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        my = tl.full((), neg_inf, tl.float32)
        sy = tl.zeros((), tl.float32)
        y_nan = tl.zeros((), tl.int32)
        block_ids = tl.arange(0, MAX_BLOCKS)
        block_ymax = tl.full((MAX_BLOCKS,), neg_inf, tl.float32)
        n_blocks = tl.cdiv(V, BLOCK_V)
        for b in range(0, n_blocks):
            cols = b * BLOCK_V + cols0
            in_row = cols < V
            x = tl.load(x_row + cols, mask=in_row, other=neg_inf).to(tl.float32) * inv_temperature
            bx = tl.max(x, 0)
            m_new = tl.maximum(m, bx)
            m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
            d = x - m_ref
            e = tl.exp(d)  # a NaN anywhere in the row makes s NaN: that is the NaN test
            # rescale the running sums to the new max: t' = e^(m-m')(t + s(m-m'))
            scale = tl.exp(m - m_ref)
            t = scale * (t + tl.where(s > 0, s * (m - m_ref), 0.0)) + tl.sum(tl.where(e > 0, e * d, 0.0), 0)
            s = s * scale + tl.sum(e, 0)
            m = m_new
            if HAS_PROXY:
                y = tl.load(y_row + cols, mask=in_row, other=neg_inf).to(tl.float32) * inv_temperature
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
        bad = (s != s) | (y_nan > 0) | (m == neg_inf) | (my == neg_inf)
        lse = m + tl.log(s)
        entropy = tl.log(s) - t / s
        if FIXED:
            cutoff = my + tl.log(sy) + log_threshold
            # no token reaches tau: K = {first argmax} alone
            cutoff = tl.where(my < cutoff, float("inf"), cutoff)
        else:
            cutoff = my + log_threshold
        my_ref = tl.where(bad, 0.0, my)

        # ---- pass 2: kept-set sums relative to the proxy max, re-reading only the blocks
        # that can hold a kept token (block max >= cutoff, or the argmax's block): a peaked
        # row re-reads one or two blocks, so the forward costs about one read of the logits.
        argmax_block = tl.where(argmax_y >= 0, argmax_y // BLOCK_V, -1)
        kept_sum = tl.zeros((), tl.float32)
        cross = tl.zeros((), tl.float32)  # sum_K e^(y-my) (y - x), only with a separate proxy
        for b in range(0, n_blocks):
            block_max = tl.max(tl.where(block_ids == b, block_ymax, neg_inf), 0)
            if (block_max >= cutoff) | (b == argmax_block):
                cols = b * BLOCK_V + cols0
                in_row = cols < V
                y = tl.load(y_row + cols, mask=in_row, other=neg_inf).to(tl.float32) * inv_temperature
                kept = ((y >= cutoff) | (cols == argmax_y)) & in_row
                e = tl.exp(y - my_ref)
                kept_sum += tl.sum(tl.where(kept, e, 0.0), 0)
                if HAS_PROXY:
                    x = tl.load(x_row + cols, mask=in_row, other=neg_inf).to(tl.float32) * inv_temperature
                    cross += tl.sum(tl.where(kept, e * (y - x), 0.0), 0)
        lse_kept = my + tl.log(kept_sum)
        if HAS_PROXY:
            kl = cross / kept_sum + lse - lse_kept
        else:
            # -log(kept mass) = log(s / kept_sum), both relative to the same max; K within
            # the row, so it is >= 0 up to rounding
            kl = tl.maximum(tl.log(s / kept_sum), 0.0)

        # ---- the sampled token
        if HAS_LABELS:
            x_label = tl.load(x_row + label).to(tl.float32) * inv_temperature
            y_label = tl.load(y_row + label).to(tl.float32) * inv_temperature
            logp = x_label - lse
            label_kept = (y_label >= cutoff) | (label == argmax_y)
            proxy_logp = tl.where(label_kept, y_label - lse_kept, neg_inf)

        nan = float("nan")
        logp = tl.where(bad, nan, logp)
        proxy_logp = tl.where(bad, nan, proxy_logp)
        kl = tl.where(bad, nan, kl)
        entropy = tl.where(bad, nan, entropy)
        lse = tl.where(bad, nan, lse)

    tl.store(logp_ptr + row, logp)
    tl.store(proxy_logp_ptr + row, proxy_logp)
    tl.store(kl_ptr + row, kl)
    tl.store(entropy_ptr + row, entropy)
    stats = row_stats_ptr + row * 5
    tl.store(stats + 0, lse)
    tl.store(stats + 1, entropy)
    tl.store(stats + 2, lse_kept)
    tl.store(stats + 3, cutoff)
    tl.store(stats + 4, argmax_y.to(tl.float32))


@triton.jit
def _token_stats_bwd_kernel(
    grad_ptr,  # output: (N, V), the logits' dtype
    logits_ptr, proxy_ptr, labels_ptr, row_stats_ptr,  # inputs
    g_logp_ptr, g_kl_ptr, g_entropy_ptr,  # upstream gradients: (N,) fp32 each, or dummies
    V, logits_row_stride, proxy_row_stride, grad_row_stride,  # shapes / strides
    inv_temperature, ignore_index,  # scalars
    HAS_PROXY: tl.constexpr, HAS_LABELS: tl.constexpr,  # features
    HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,  # tile
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    g_row = grad_ptr + row * grad_row_stride
    label = -1
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    else:
        valid = row >= 0
    stats = row_stats_ptr + row * 5
    lse = tl.load(stats + 0)
    entropy = tl.load(stats + 1)
    lse_kept = tl.load(stats + 2)
    cutoff = tl.load(stats + 3)
    argmax_y = tl.load(stats + 4).to(tl.int64)
    g_logp = 0.0
    g_kl = 0.0
    g_entropy = 0.0
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    if HAS_G_KL:
        g_kl = tl.load(g_kl_ptr + row)
    if HAS_G_ENTROPY:
        g_entropy = tl.load(g_entropy_ptr + row)
    # ignored rows: every coefficient is zero (and lse is never read as NaN)
    g_logp = tl.where(valid, g_logp, 0.0) * inv_temperature
    g_kl = tl.where(valid, g_kl, 0.0) * inv_temperature
    g_entropy = tl.where(valid, g_entropy, 0.0) * inv_temperature
    lse = tl.where(valid, lse, 0.0)
    inv_kept_mass = tl.exp(lse - tl.where(valid, lse_kept, 0.0))
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        in_row = cols < V
        x = tl.load(x_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
        logp = x - lse
        p = tl.exp(logp)
        grad = tl.zeros((BLOCK_V,), tl.float32)
        if HAS_G_LOGP:
            grad += g_logp * (tl.where(cols == label, 1.0, 0.0) - p)
        if HAS_G_KL:
            if HAS_PROXY:
                y = tl.load(proxy_ptr + row * proxy_row_stride + cols, mask=in_row, other=float("-inf"))
                y = y.to(tl.float32) * inv_temperature
                q = tl.where((y >= cutoff) | (cols == argmax_y), tl.exp(y - lse_kept), 0.0)
            else:
                # on-policy q = p / m on K, with 1/m = e^(lse - lse_K): no second exp
                q = tl.where((x >= cutoff) | (cols == argmax_y), p * inv_kept_mass, 0.0)
            grad += g_kl * (p - q)
        if HAS_G_ENTROPY:
            # p log p -> 0 where p = 0 (x = -inf); NaN rows stay NaN through H
            grad -= g_entropy * tl.where(x == float("-inf"), 0.0, p * (logp + entropy))
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block_v(V, max_block):
    return min(max_block, triton.next_power_of_2(max(V, 16)))


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index):
    """Launch the forward. logits/proxy: (N, V) unit-stride rows; labels: (N,) int64 or None.

    Returns (logp, proxy_logp, kl, entropy, row_stats): (N,) fp32 x4 and (N, 5) fp32.
    """
    import torch

    assert logits.dim() == 2 and logits.stride(-1) == 1
    assert proxy is None or (proxy.shape == logits.shape and proxy.stride(-1) == 1)
    N, V = logits.shape
    out = [torch.empty((N,), dtype=torch.float32, device=logits.device) for _ in range(4)]
    row_stats = torch.empty((N, ROW_STATS_WIDTH), dtype=torch.float32, device=logits.device)
    if N == 0:
        return out[0], out[1], out[2], out[3], row_stats
    on_gpu = logits.is_cuda
    block_v = _block_v(V, 4096 if on_gpu else 1024)
    _token_stats_fwd_kernel[(N,)](
        out[0], out[1], out[2], out[3], row_stats,
        logits, proxy if proxy is not None else logits, labels if labels is not None else logits,
        V, logits.stride(0), proxy.stride(0) if proxy is not None else 0,
        float(inv_temperature), float(log_threshold), int(ignore_index),
        HAS_PROXY=proxy is not None, HAS_LABELS=labels is not None, FIXED=bool(fixed),
        BLOCK_V=block_v, MAX_BLOCKS=max(16, triton.next_power_of_2(triton.cdiv(V, block_v))),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return out[0], out[1], out[2], out[3], row_stats


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy,
                         inv_temperature, ignore_index):
    """Launch the backward; g_*: (N,) fp32 or None. Returns grad_logits (N, V) in logits.dtype."""
    import torch

    assert logits.dim() == 2 and logits.stride(-1) == 1
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    on_gpu = logits.is_cuda
    block_v = _block_v(V, 4096 if on_gpu else 1024)
    dummy = row_stats
    _token_stats_bwd_kernel[(N,)](
        grad,
        logits, proxy if proxy is not None else logits, labels if labels is not None else logits, row_stats,
        g_logp if g_logp is not None else dummy, g_kl if g_kl is not None else dummy,
        g_entropy if g_entropy is not None else dummy,
        V, logits.stride(0), proxy.stride(0) if proxy is not None else 0, grad.stride(0),
        float(inv_temperature), int(ignore_index),
        HAS_PROXY=proxy is not None, HAS_LABELS=labels is not None,
        HAS_G_LOGP=g_logp is not None, HAS_G_KL=g_kl is not None, HAS_G_ENTROPY=g_entropy is not None,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return grad
