"""Token statistics against a sparse (top-k) proxy (docs/spec.md §1, §2 and §4), Triton.

The proxy is recorded at rollout time as k (index, log q) pairs per row (`lpreg.build_proxy`);
padding entries have log q = -inf. Per row, with x = z/T:

    lse  = logsumexp(x)                      logp       = x[label] - lse
    H    = log s - t/s,  s = sum e^(x-m), t = sum e^(x-m)(x-m), m = max x       (entropy)
    kl   = sum_j q_j (log q_j - (x[idx_j] - lse))        (terms with log q_j > -inf only, k gathered
                                              logits; x[idx_j] = -inf there gives +inf)
    proxy_logp = label_logq[row]              when the proxy carries the label's exact log q
               = log q_j where idx_j == label, else -inf        otherwise

Backward, for upstream (g_logp, g_kl, g_H) per row:

    grad_z = (g_logp (e_label - p) + g_kl (p - q_sparse) - g_H p (log p + H)) / T

written as one dense pass (everything but the -g_kl q term), then the k entries idx_j are
recomputed in fp32 with the -g_kl q_j term and overwritten, so every gradient entry is
rounded once. Indices must be unique within a row (top-k gives that).

Row-statistics contract (shared with the torch backend, lpreg._sparse_proxy_torch_backend):
the forward returns `row_stats` (N, 2) fp32 = [lse, H] (the first two token-stats slots of
lpreg._contract); the backward needs nothing else but the logits, labels and the
proxy. A row holding a NaN or a +inf, or only -inf, gives NaN outputs. Ignored-row
invariant (as for token stats): a row whose label is `ignore_index` gives zero outputs and
zero row_stats, and its backward writes exact zeros without reading row_stats or computing
p (from lse = 0, p = exp(x) overflows for a logit above about 88, and 0 * inf = NaN).

Limits: any V (tail masked, int64 offsets), k <= 4096, fp32/bf16/fp16 logits with fp32
accumulation, unit-stride rows (any stride when V = 1 or N = 0).
Memory traffic: forward reads each row once plus k gathered logits; backward reads each row
once, writes the gradient once, and re-reads / re-writes k entries.
"""

import triton
import triton.language as tl

from .. import _contract as _layout
from . import _row_helpers as rh

ROW_STATS_WIDTH = _layout.SPARSE_PROXY_WIDTH  # [lse, entropy]
_WIDTH = tl.constexpr(ROW_STATS_WIDTH)


@triton.jit
def _sparse_proxy_fwd_kernel(
    logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row_stats_ptr,  # outputs: (N,) x4, (N, 2)
    logits_ptr, labels_ptr, idx_ptr, logq_ptr, label_logq_ptr,  # inputs: (N, V), (N,), (N, k) x2, (N,)
    V, K, logits_row_stride, idx_row_stride, logq_row_stride,  # shapes / strides
    inv_temperature, softcap, ignore_index,  # scalars: fp32 (s / T), fp32 (c / T), int
    HAS_LABELS: tl.constexpr, HAS_LABEL_LOGQ: tl.constexpr, SOFTCAP: tl.constexpr,  # features
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,  # tiles
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    label, valid = rh.row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    neg_inf = float("-inf")
    logp, proxy_logp, kl, entropy, lse = rh.zero_outputs()  # an ignored row keeps these zeros
    if valid:
        # ---- one pass: online max, sum e^(x-m) and the entropy moment t
        cols0 = tl.arange(0, BLOCK_V)
        m = tl.full((), neg_inf, tl.float32)
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            x = rh.load_scaled(x_row, start + cols0, V, inv_temperature, softcap, SOFTCAP)
            m, s, t = rh.online_softmax_update(m, s, t, x, tl.max(x, 0))  # a NaN in x makes s NaN
        bad = (s != s) | (m == neg_inf) | (m == float("inf"))  # a NaN, +inf, or only -inf
        lse, entropy = rh.lse_entropy(m, s, t)

        # ---- the k proxy entries: KL = sum_j q_j (log q_j - log p_idx_j)
        ks = tl.arange(0, BLOCK_K)
        in_k = ks < K
        idx = tl.load(idx_ptr + row * idx_row_stride + ks, mask=in_k, other=0)
        logq = tl.load(logq_ptr + row * logq_row_stride + ks, mask=in_k, other=neg_inf).to(tl.float32)
        x_idx = rh.transform(tl.load(x_row + idx, mask=in_k, other=0.0).to(tl.float32), inv_temperature, softcap,
                             SOFTCAP)
        q = tl.exp(logq)
        # an entry with finite log q has q > 0 even where q underflows fp32: at x_idx = -inf
        # (p = 0) its term is +inf, not 0 * inf = NaN; padding (log q = -inf) adds nothing
        term = tl.where(x_idx == neg_inf, float("inf"), q * (logq - (x_idx - lse)))
        kl = tl.sum(tl.where(logq > neg_inf, term, 0.0), 0)
        if HAS_LABELS:
            logp = rh.transform(tl.load(x_row + label).to(tl.float32), inv_temperature, softcap, SOFTCAP) - lse
            if HAS_LABEL_LOGQ:
                proxy_logp = tl.load(label_logq_ptr + row)  # exact, even for a label outside the top-k
            else:
                proxy_logp = tl.max(tl.where((idx == label) & in_k, logq, neg_inf), 0)
        logp, proxy_logp, kl, entropy, lse = rh.nan_epilogue(bad, logp, proxy_logp, kl, entropy, lse)
    rh.store_outputs(logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row, logp, proxy_logp, kl, entropy)
    rh.store_stat(row_stats_ptr, row, _WIDTH, rh.LSE, lse)
    rh.store_stat(row_stats_ptr, row, _WIDTH, rh.ENTROPY, entropy)


@triton.jit
def _sparse_proxy_bwd_kernel(
    grad_ptr,  # output: (N, V), the logits' dtype
    logits_ptr, labels_ptr, idx_ptr, logq_ptr, row_stats_ptr,  # inputs
    g_logp_ptr, g_kl_ptr, g_entropy_ptr,  # upstream gradients: (N,) fp32 each, or dummies
    V, K, logits_row_stride, idx_row_stride, logq_row_stride, grad_row_stride,  # shapes / strides
    inv_temperature, softcap, ignore_index, vocab_offset,  # scalars (vocab_offset: the shard's first global column)
    HAS_LABELS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr,  # features
    HAS_G_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,  # tiles
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * logits_row_stride
    g_row = grad_ptr + row * grad_row_stride
    label, valid = rh.row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if valid:
        lse = rh.load_stat(row_stats_ptr, row, _WIDTH, rh.LSE)
        entropy = rh.load_stat(row_stats_ptr, row, _WIDTH, rh.ENTROPY)
        g_logp, g_kl, g_entropy = rh.upstream_coefficients(
            g_logp_ptr, g_kl_ptr, g_entropy_ptr, row, inv_temperature, HAS_G_LOGP, HAS_G_KL, HAS_G_ENTROPY)
        label = label - vocab_offset  # a column of this shard (outside [0, V) on another shard's)
        # ---- dense pass: g_logp (e_y - p) + g_kl p - g_H p (log p + H)
        cols0 = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            x = rh.load_scaled(x_row, cols, V, inv_temperature, softcap, SOFTCAP)
            logp = x - lse
            p = tl.exp(logp)
            grad = (g_kl - g_logp) * p + tl.where(cols == label, g_logp, 0.0)
            if HAS_G_ENTROPY:
                grad -= g_entropy * rh.entropy_grad(p, logp, entropy)
            if SOFTCAP:  # the chain rule through the soft-cap (the scale is in the coefficients)
                grad *= rh.transform_slope(x, softcap, SOFTCAP)
            tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)
        if HAS_G_KL:
            # ---- sparse pass: - g_kl q_j at idx_j (after the dense stores of this row are visible)
            tl.debug_barrier()
            ks = tl.arange(0, BLOCK_K)
            in_k = ks < K
            # the recorded global columns as this shard's; entries another shard holds are skipped
            idx = tl.load(idx_ptr + row * idx_row_stride + ks, mask=in_k, other=0) - vocab_offset
            q = tl.exp(tl.load(logq_ptr + row * logq_row_stride + ks, mask=in_k, other=float("-inf")).to(tl.float32))
            upd = in_k & (q > 0) & (idx >= 0) & (idx < V)
            # recompute the whole fp32 gradient at idx_j and overwrite: rounded once, like the
            # dense entries
            x = rh.transform(tl.load(x_row + idx, mask=upd, other=0.0).to(tl.float32), inv_temperature, softcap,
                             SOFTCAP)
            logp = x - lse
            p = tl.exp(logp)
            grad = (g_kl - g_logp) * p + tl.where(idx == label, g_logp, 0.0) - g_kl * q
            if HAS_G_ENTROPY:
                grad -= g_entropy * rh.entropy_grad(p, logp, entropy)
            if SOFTCAP:
                grad *= rh.transform_slope(x, softcap, SOFTCAP)
            tl.store(g_row + idx, grad.to(grad_ptr.dtype.element_ty), mask=upd)
    else:
        rh.zero_row(g_row, V, BLOCK_V)  # the ignored-row invariant: no p, no row_stats read


def _blocks(V, K, on_gpu):
    block_v = min(4096 if on_gpu else 1024, triton.next_power_of_2(max(V, 16)))
    block_k = triton.next_power_of_2(max(K, 16))
    assert block_k <= 4096, "sparse proxy supports k <= 4096"
    return block_v, block_k


def sparse_proxy_forward(logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, logit_scale=1.0,
                         logit_softcap=None):
    """logits (N, V), labels (N,) int64 or None, indices (N, k) int64, logq (N, k) fp32,
    label_logq (N,) fp32 or None (the labels' exact log q).

    Returns (logp, proxy_logp, kl, entropy, row_stats): (N,) fp32 x4 and (N, 2) fp32.
    """
    import torch

    assert logits.dim() == 2 and rh.unit_stride_rows(logits)  # V = 1 or N = 0: any stride
    assert indices.shape == logq.shape and indices.shape[0] == logits.shape[0]
    assert indices.dtype == torch.int64 and rh.unit_stride_rows(indices) and rh.unit_stride_rows(logq)
    assert label_logq is None or (label_logq.shape == (logits.shape[0],) and label_logq.dtype == torch.float32)
    N, V = logits.shape
    K = indices.shape[1]
    out = [torch.empty((N,), dtype=torch.float32, device=logits.device) for _ in range(4)]
    row_stats = torch.empty((N, ROW_STATS_WIDTH), dtype=torch.float32, device=logits.device)
    if N == 0:
        return out[0], out[1], out[2], out[3], row_stats
    block_v, block_k = _blocks(V, K, logits.is_cuda)
    has_label_logq = labels is not None and label_logq is not None
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    _sparse_proxy_fwd_kernel[(N,)](
        out[0], out[1], out[2], out[3], row_stats,
        logits, labels if labels is not None else logits, indices, logq,
        label_logq.contiguous() if has_label_logq else logq,
        V, K, logits.stride(0), indices.stride(0), logq.stride(0),
        mult, cap, int(ignore_index),
        HAS_LABELS=labels is not None, HAS_LABEL_LOGQ=has_label_logq, SOFTCAP=cap > 0,
        BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return out[0], out[1], out[2], out[3], row_stats


def sparse_proxy_backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy,
                          inv_temperature, ignore_index, vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    """g_*: (N,) fp32 or None. Returns grad_logits (N, V) in logits.dtype of the shard holding
    columns [vocab_offset, vocab_offset + V) (labels and indices are global columns)."""
    import torch

    assert logits.dim() == 2 and rh.unit_stride_rows(logits)  # V = 1 or N = 0: any stride
    N, V = logits.shape
    K = indices.shape[1]
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    block_v, block_k = _blocks(V, K, logits.is_cuda)
    dummy = row_stats
    mult, cap = _layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    _sparse_proxy_bwd_kernel[(N,)](
        grad,
        logits, labels if labels is not None else logits, indices, logq, row_stats,
        g_logp if g_logp is not None else dummy, g_kl if g_kl is not None else dummy,
        g_entropy if g_entropy is not None else dummy,
        V, K, logits.stride(0), indices.stride(0), logq.stride(0), grad.stride(0),
        mult, cap, int(ignore_index), int(vocab_offset),
        HAS_LABELS=labels is not None, SOFTCAP=cap > 0, HAS_G_LOGP=g_logp is not None, HAS_G_KL=g_kl is not None,
        HAS_G_ENTROPY=g_entropy is not None,
        BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return grad
