"""Sparse proxy with PyTorch ops: `build_proxy`'s rows, and backend="torch" of the
`lpreg::sparse_proxy_stats` op.

The op functions keep the contract of the Triton kernels in lpreg.kernels.sparse_proxy_stats
(see its header for the math; row_stats (N, 2) = [lse, H], and the ignored-row invariant of
lpreg._contract). Rows are processed in chunks (`lpreg._rows.row_chunks`), so at
most a chunk of fp32 temporaries is alive at once, on any device. This module also serves
backend="cpu" and "cuda": the compiled extension has no sparse-proxy kernel.
"""

import torch

from . import _contract as layout
from ._rows import entropy_term, kept_cutoff, kept_mask, lse_and_entropy, masked_rows, row_chunks, upstream, valid_rows

_NEG_INF = float("-inf")


def build_proxy_rows(x, labels, inv_temperature, fixed, log_threshold, k, ignore_index):
    """Top-k sparse proxy of rows x (N, V): (indices (N, k) int32, logq (N, k) fp32,
    coverage (N,) fp32, label_logq (N,) fp32 or None).

    K is the kept set of docs/spec.md §1, computed as the kernels do (`kept_cutoff`). The
    captured entries are the k largest kept ones; logq is renormalised over them and
    coverage = captured kept mass / kept mass (exactly 1 when |K| <= k). label_logq is the
    label's exact log q = y_label - lse_K (not renormalised; -inf outside K, 0 on ignored
    rows): the value the dense proxy gives, whether or not the label is among the top k.
    """
    N, V = x.shape
    dev = x.device
    kk = min(k, V)
    idx = torch.zeros((N, k), dtype=torch.int32, device=dev)
    logq = torch.full((N, k), _NEG_INF, dtype=torch.float32, device=dev)
    cov = torch.empty((N,), dtype=torch.float32, device=dev)
    label_logq = None if labels is None else torch.zeros((N,), dtype=torch.float32, device=dev)
    for a, b in row_chunks(N, V):
        y = x[a:b].float() * inv_temperature
        my, my_ref, ey, cutoff, argmax_y = kept_cutoff(y, fixed, log_threshold)
        kept = kept_mask(y, cutoff, argmax_y)
        lse_kept = my_ref + torch.where(kept, ey, torch.zeros_like(ey)).sum(-1).log()
        del ey
        yk = torch.where(kept, y, torch.full_like(y, _NEG_INF))
        vals, top = torch.topk(yk, kk, dim=-1)  # captured = kept entries among the k largest
        lse_cap = torch.logsumexp(vals, -1)
        bad = torch.isnan(y).any(-1) | (my == _NEG_INF)
        nan = torch.full_like(lse_cap, float("nan"))
        # -inf stays -inf for non-kept entries
        logq[a:b, :kk] = torch.where(bad[:, None], nan[:, None], vals - lse_cap[:, None])
        logq[a:b, kk:] = torch.where(bad[:, None], nan[:, None], logq[a:b, kk:])
        idx[a:b, :kk] = top.to(torch.int32)
        # every kept entry captured: exactly 1 (the two sums differ only in summation order)
        full = torch.where(kept.sum(-1) <= kk, torch.ones_like(lse_cap), torch.exp(lse_cap - lse_kept))
        cov[a:b] = torch.where(bad, nan, full)
        if labels is not None:
            valid = labels[a:b] != ignore_index
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b])).long()[:, None]
            in_k = kept.gather(-1, safe)[:, 0]
            exact = torch.where(in_k, y.gather(-1, safe)[:, 0] - lse_kept, torch.full_like(lse_kept, _NEG_INF))
            label_logq[a:b] = torch.where(valid, torch.where(bad, nan, exact), torch.zeros_like(exact))
    return idx, logq, cov, label_logq


def sparse_proxy_forward(logits, labels, indices, logq, label_logq, inv_temperature, ignore_index):
    N, V = logits.shape
    dev = logits.device
    out = [torch.zeros((N,), dtype=torch.float32, device=dev) for _ in range(4)]
    row_stats = torch.zeros((N, layout.SPARSE_PROXY_WIDTH), dtype=torch.float32, device=dev)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        m, lse, entropy = lse_and_entropy(x)
        lq = logq[a:b].float()
        q = lq.exp()
        x_idx = x.gather(-1, indices[a:b])
        # KL(q || p) = sum_j q_j (log q_j - (x_idx_j - lse)), 0 log 0 = 0 for padding (log q =
        # -inf); a finite log q has q > 0 even where q underflows fp32, so at x_idx = -inf (p = 0)
        # its term is +inf, not 0 * inf = NaN
        term = torch.where(x_idx == _NEG_INF, torch.full_like(q, float("inf")), q * (lq - (x_idx - lse[:, None])))
        kl = torch.where(lq > _NEG_INF, term, torch.zeros_like(q)).sum(-1)
        bad = ~torch.isfinite(m)  # a NaN (amax propagates it), a +inf, or only -inf
        valid = valid_rows(labels, a, b, ignore_index, x)
        if labels is not None:
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b]))
            logp = x.gather(-1, safe[:, None])[:, 0] - lse
            if label_logq is not None:
                proxy_logp = label_logq[a:b].float()  # exact, even for a label outside the top-k
            else:
                hit = indices[a:b] == safe[:, None]
                proxy_logp = torch.where(hit, lq, torch.full_like(lq, _NEG_INF)).amax(-1)
        else:
            logp = proxy_logp = torch.zeros_like(lse)
        nan = torch.full_like(lse, float("nan"))
        for i, v in enumerate((logp, proxy_logp, kl, entropy)):
            out[i][a:b] = torch.where(valid, torch.where(bad, nan, v), torch.zeros_like(v))
        stats = [None] * layout.SPARSE_PROXY_WIDTH
        stats[layout.LSE], stats[layout.ENTROPY] = torch.where(bad, nan, lse), entropy
        stats = torch.stack(stats, -1)
        row_stats[a:b] = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return out[0], out[1], out[2], out[3], row_stats


def sparse_proxy_backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature,
                          ignore_index):
    N, V = logits.shape
    grad = torch.empty_like(logits)
    for a, b in row_chunks(N, V):
        valid = valid_rows(labels, a, b, ignore_index, logits)
        x = masked_rows(logits[a:b], valid, inv_temperature)  # ignored rows: all -inf, p = 0
        st = torch.where(valid[:, None], row_stats[a:b], torch.zeros_like(row_stats[a:b]))
        lse, entropy = st[:, layout.LSE], st[:, layout.ENTROPY]
        logp = x - lse[:, None]
        p = logp.exp()
        g = torch.zeros_like(x)
        if g_logp is not None:
            c = upstream(g_logp, a, b, valid)
            g -= c[:, None] * p
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b]))
            g.scatter_add_(-1, safe[:, None], c[:, None])
        if g_kl is not None:
            c = upstream(g_kl, a, b, valid)
            # ignored rows: q = 0 too (their logq may be anything, NaN included)
            q = torch.where(valid[:, None], logq[a:b].float().exp(), torch.zeros_like(logq[a:b], dtype=torch.float32))
            g += c[:, None] * p
            g.scatter_add_(-1, indices[a:b], -c[:, None] * q)  # - g_kl q_sparse
        if g_entropy is not None:
            g -= upstream(g_entropy, a, b, valid)[:, None] * entropy_term(p, logp, entropy)
        grad[a:b] = (g * inv_temperature).to(grad.dtype)
    return grad
