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
from ._rows import (
    dense_backward,
    forward_outputs,
    kept_cutoff,
    kept_mask,
    local_index,
    lse_and_entropy,
    mask_outputs,
    row_chunks,
    scaled_rows,
    sparse_kl,
    sparse_proxy_logp,
    upstream,
    valid_rows,
)

_NEG_INF = float("-inf")


def build_proxy_rows(x, labels, inv_temperature, fixed, log_threshold, k, ignore_index, logit_scale=1.0,
                     logit_softcap=None):
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
        y = scaled_rows(x[a:b], inv_temperature, logit_scale, logit_softcap)
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


def sparse_proxy_forward(logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, logit_scale=1.0,
                         logit_softcap=None):
    N, V = logits.shape
    out, row_stats = forward_outputs(logits, layout.SPARSE_PROXY_WIDTH)
    for a, b in row_chunks(N, V):
        x = scaled_rows(logits[a:b], inv_temperature, logit_scale, logit_softcap)
        m, lse, entropy = lse_and_entropy(x)
        kl = sparse_kl(x.gather(-1, indices[a:b]), logq[a:b].float(), lse, True)  # KL(q || p) over the k entries
        bad = ~torch.isfinite(m)  # a NaN (amax propagates it), a +inf, or only -inf
        valid = valid_rows(labels, a, b, ignore_index, x)
        logp = proxy_logp = torch.zeros_like(lse)
        if labels is not None:
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b]))
            logp = x.gather(-1, safe[:, None])[:, 0] - lse
            proxy_logp = sparse_proxy_logp(safe, indices[a:b], logq[a:b].float(),
                                           None if label_logq is None else label_logq[a:b])
        for o, v in zip(out, mask_outputs((logp, proxy_logp, kl, entropy), bad, valid)):
            o[a:b] = v
        stats = [None] * layout.SPARSE_PROXY_WIDTH
        stats[layout.LSE], stats[layout.ENTROPY] = torch.where(bad, torch.full_like(lse, float("nan")), lse), entropy
        stats = torch.stack(stats, -1)
        row_stats[a:b] = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return out[0], out[1], out[2], out[3], row_stats


def sparse_proxy_backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature,
                          ignore_index, vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    V = logits.shape[1]

    def kl_term(a, b, valid, x, p, st):  # g_kl (p - q_sparse): q_j at the k recorded global indices idx_j
        if g_kl is None:
            return None
        c = upstream(g_kl, a, b, valid)
        col, here = local_index(indices[a:b], vocab_offset, V)
        # ignored rows: q = 0 too (their logq may be anything, NaN included); entries of other shards: 0
        q = torch.where(valid[:, None] & here, logq[a:b].float().exp(), torch.zeros((), device=x.device))
        return (c[:, None] * p).scatter_add_(-1, col, -c[:, None] * q)

    return dense_backward(logits, labels, row_stats, g_logp, g_entropy, inv_temperature, ignore_index, vocab_offset,
                          kl_term, logit_scale, logit_softcap)
