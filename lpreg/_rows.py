"""Row helpers shared by the PyTorch paths: (..., V) tensors as (N, V) rows, walked in chunks, and
the row math both PyTorch backends (token stats, sparse proxy) compute the same way.

`row_chunks` is the one row chunker of the pure-PyTorch paths (the torch backends and the
float64-capable oracle in lpreg.reference): a chunk holds at most CHUNK_ELEMENTS fp32
temporaries per live tensor (about 16 MiB), whatever N and V. The math helpers follow the
kernels' definitions (lpreg.kernels.token_stats states them); a backend imports them from here,
never from another backend.
"""

import math
from typing import Iterator

import torch
from torch import Tensor

from . import _contract as layout

_NEG_INF = float("-inf")

CHUNK_ELEMENTS = 1 << 22


def row_chunks(N: int, V: int) -> Iterator[tuple[int, int]]:
    """Row ranges [a, b) that cover [0, N), each at most max(1, CHUNK_ELEMENTS // V) rows."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, N, step):
        yield start, min(N, start + step)


def forward_outputs(logits: Tensor, width: int):
    """A per-row forward's outputs, zero-filled: four (N,) fp32 vectors (logp, proxy_logp, kl,
    entropy) and row_stats (N, width) fp32."""
    N, dev = logits.shape[0], logits.device
    out = [torch.zeros((N,), dtype=torch.float32, device=dev) for _ in range(4)]
    return out, torch.zeros((N, width), dtype=torch.float32, device=dev)


def as_rows(t: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit-stride rows (a view whenever possible). V = 0 is legal (an empty
    vocabulary shard, docs/spec.md §6): N is the product of the leading dimensions, never inferred
    from the element count (which cannot tell N from 0 elements)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def softmax_moments(x):
    """Rows of x: (m, m_ref, s, t) with m the max (NaN when the row holds one), m_ref the max with
    -inf read as 0, s = sum e^(x-m_ref) and t = sum e^(x-m_ref)(x-m_ref); -inf entries contribute
    nothing (0 log 0 = 0), so an all -inf row has s = t = 0."""
    m = x.amax(-1)
    m_ref = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    d = x - m_ref[:, None]
    e = d.exp()
    t = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(-1)
    return m, m_ref, e.sum(-1), t


def lse_and_entropy(x):
    """Rows of x: (max, logsumexp, entropy), with H = log s - t/s (`softmax_moments`)."""
    m, m_ref, s, t = softmax_moments(x)
    return m, m_ref + s.log(), s.log() - t / s


def kept_cutoff(y, fixed, log_threshold):
    """The kept set K of rows of y = proxy / T (docs/spec.md §1), as the kernels define it.

    Returns (my, my_ref, ey, cutoff, argmax_y): the row max, the max with -inf read as 0,
    e^(y - my_ref), the cutoff (y_i >= cutoff keeps i) and the first argmax ("fixed" mode;
    -1 in "min_p", where the argmax is kept anyway).
    """
    my = y.amax(-1)
    my_ref = torch.where(my == _NEG_INF, torch.zeros_like(my), my)
    ey = (y - my_ref[:, None]).exp()
    if fixed:
        lse_y = my_ref + ey.sum(-1).log()
        cutoff = lse_y + log_threshold
        cutoff = torch.where(my < cutoff, torch.full_like(cutoff, float("inf")), cutoff)  # K = {argmax}
        argmax_y = y.argmax(-1)  # first maximum, as the kernels
    else:
        cutoff = my + log_threshold
        argmax_y = torch.full_like(my, layout.NO_ARGMAX, dtype=torch.long)
    return my, my_ref, ey, cutoff, argmax_y


def kept_mask(y, cutoff, argmax_y):
    cols = torch.arange(y.shape[-1], device=y.device)
    return (y >= cutoff[:, None]) | (cols[None, :] == argmax_y[:, None])


def ignored_row_stats(n, width, device):
    """Row statistics of ignored rows (the ignored-row invariant): zeros, argmax -1."""
    stats = torch.zeros((n, width), dtype=torch.float32, device=device)
    if width > layout.ARGMAX:
        stats[:, layout.ARGMAX] = layout.NO_ARGMAX
    return stats


def finish_rows(lse, entropy, lse_kept, cutoff, argmax_y, kl, bad, valid, label=None, x_label=None, y_label=None):
    """The epilogue of a token-stats forward over rows whose statistics are complete (one chunk of
    a whole row, or the ranks' shards combined): the outputs (logp, proxy_logp, kl, entropy), each
    (n,), and row_stats (n, 5). logp = x_y - lse; proxy_logp = y_y - lse_K when y is kept (y_y >=
    cutoff, or y is the argmax), else -inf. A bad row (a NaN, a +inf, or only -inf) gives NaN
    outputs and a NaN lse (so its gradient is NaN too); an invalid (ignored) row gives zeros and
    the ignored-row statistics. label, x_label, y_label: (n,) global label index and the scaled
    logits there, or None without labels."""
    if label is None:
        logp = proxy_logp = torch.zeros_like(lse)
    else:
        logp = x_label - lse
        label_kept = (y_label >= cutoff) | (label == argmax_y)
        proxy_logp = torch.where(label_kept, y_label - lse_kept, torch.full_like(lse, _NEG_INF))
    outs = mask_outputs((logp, proxy_logp, kl, entropy), bad, valid)
    cols = [None] * layout.TOKEN_STATS_WIDTH  # the layout's slot order
    cols[layout.LSE], cols[layout.ENTROPY] = torch.where(bad, torch.full_like(lse, float("nan")), lse), entropy
    cols[layout.LSE_KEPT], cols[layout.CUTOFF], cols[layout.ARGMAX] = lse_kept, cutoff, argmax_y.float()
    stats = torch.stack(cols, -1)
    ignored = ignored_row_stats(lse.shape[0], layout.TOKEN_STATS_WIDTH, lse.device)
    return outs, torch.where(valid[:, None], stats, ignored)


def mask_outputs(values, bad, valid):
    """Per-row outputs as every backend returns them: NaN on a bad row, 0 on an ignored one."""
    nan = torch.full_like(values[0], float("nan"))
    return [torch.where(valid, torch.where(bad, nan, v), torch.zeros_like(v)) for v in values]


def valid_rows(labels, a, b, ignore_index, like):
    """(b - a,) bool: rows of [a, b) that count (all of them without labels)."""
    if labels is None:
        return torch.ones((b - a,), dtype=torch.bool, device=like.device)
    return labels[a:b] != ignore_index


def scaled_rows(t, inv_temperature, logit_scale=1.0, logit_softcap=None):
    """x' = z / T in fp32 of raw logits t, z the logit transform (lpreg._contract.transform_constants):
    cap tanh(t mult / cap) with a soft-cap, else t mult (t / T exactly for the identity). The
    soft-cap maps -inf to -c / T and +inf to c / T; a NaN stays NaN."""
    mult, cap = layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    if cap:
        return torch.tanh(t.float() * (mult / cap)) * cap
    return t.float() * mult


def transform_slope(x, inv_temperature, logit_scale=1.0, logit_softcap=None):
    """dx'/dx at x' = `x` (scaled_rows' output): mult (1 - (x' / cap)^2) with a soft-cap, else
    mult. An ignored row's -inf (masked_rows) gets slope mult: its gradient is an exact 0 anyway."""
    mult, cap = layout.transform_constants(inv_temperature, logit_scale, logit_softcap)
    if not cap:
        return mult
    u = x / cap
    return torch.where(x == _NEG_INF, torch.ones_like(x), 1.0 - u * u) * mult


def masked_rows(t, valid, inv_temperature, logit_scale=1.0, logit_softcap=None):
    """t / T (scaled_rows) in fp32 with every ignored row set to -inf: the ignored-row invariant for the
    dense backward. Such a row is then an empty row, where p and q are exactly 0 and no
    exp overflows (its zeroed row_stats are never a softmax state to recompute p from)."""
    x = scaled_rows(t, inv_temperature, logit_scale, logit_softcap)
    return torch.where(valid[:, None], x, torch.full_like(x, _NEG_INF))


def upstream(g, a, b, valid):
    """The upstream gradient of rows [a, b), 0 on ignored rows."""
    return torch.where(valid, g[a:b].float(), torch.zeros((), dtype=torch.float32, device=valid.device))


def entropy_term(p, logp, entropy):
    """p (log p + H), with 0 log 0 = 0 wherever p = 0: x = -inf (ignored rows included), and a
    finite x whose x - lse rounds to -inf. A NaN p (a NaN row) stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * (logp + entropy[:, None]))


def local_index(index, vocab_offset, V):
    """Global vocabulary indices -> (local column in [0, V), whether this shard holds it): the
    shard holds columns [vocab_offset, vocab_offset + V) (vocab_offset = 0, V = the whole
    vocabulary, unsharded). A column outside is 0 with False, safe to gather and scatter."""
    local = index - vocab_offset
    here = (local >= 0) & (local < V)
    return torch.where(here, local, torch.zeros_like(local)), here


def dense_backward(logits, labels, row_stats, g_logp, g_entropy, inv_temperature, ignore_index, vocab_offset,
                   kl_term, logit_scale=1.0, logit_softcap=None):
    """The row-chunked backward both PyTorch backends share (docs/spec.md §2):

        grad_z = (g_logp (e_y - p) + [kl_term] - g_H p (log p + H)) / T,   grad_x = grad_z dz/dx

    on the shard of columns [vocab_offset, vocab_offset + V) (labels are global indices; the one-hot
    lands only where this shard holds the label). kl_term(a, b, valid, x, p, stats) returns the
    g_kl part of rows [a, b), or None. Ignored rows are all -inf before the exponential (the
    ignored-row invariant) and their statistics zeros, so their gradient is exactly 0. The logit
    transform: x' = scaled_rows(logits), and grad (w.r.t. x') times transform_slope (= 1 / T without one)."""
    N, V = logits.shape
    grad = torch.empty_like(logits)
    for a, b in row_chunks(N, V):
        valid = valid_rows(labels, a, b, ignore_index, logits)
        x = masked_rows(logits[a:b], valid, inv_temperature, logit_scale, logit_softcap)
        st = torch.where(valid[:, None], row_stats[a:b], torch.zeros_like(row_stats[a:b]))
        lse, entropy = st[:, layout.LSE], st[:, layout.ENTROPY]
        logp = x - lse[:, None]
        p = logp.exp()
        g = torch.zeros_like(x)
        if g_logp is not None:
            coef = upstream(g_logp, a, b, valid)
            g -= coef[:, None] * p
            col, here = local_index(labels[a:b], vocab_offset, V)
            g.scatter_add_(-1, col[:, None], torch.where(here, coef, torch.zeros_like(coef))[:, None])
        kl = kl_term(a, b, valid, x, p, st)
        if kl is not None:
            g += kl
        if g_entropy is not None:
            g -= upstream(g_entropy, a, b, valid)[:, None] * entropy_term(p, logp, entropy)
        grad[a:b] = (g * transform_slope(x, inv_temperature, logit_scale, logit_softcap)).to(grad.dtype)
    return grad


def sparse_kl(x_idx, logq, lse, keep):
    """The KL against a sparse proxy, sum_j q_j (log q_j - (x_idx_j - lse)) per row, over the entries
    `keep` (bool, broadcastable) whose log q_j > -inf. A finite log q has q > 0 even where q
    underflows fp32, so at x_idx = -inf (p = 0) its term is +inf, not 0 * inf = NaN; padding
    (log q = -inf) adds nothing."""
    q = logq.exp()
    term = torch.where(x_idx == _NEG_INF, torch.full_like(q, float("inf")), q * (logq - (x_idx - lse[:, None])))
    return torch.where((logq > _NEG_INF) & keep, term, torch.zeros_like(q)).sum(-1)


def sparse_proxy_logp(label, indices, logq, label_logq):
    """log q of each row's label: the proxy's exact `label_logq` when it carries one (even for a
    label outside the top k), else the captured entry's log q (-inf when the label is not among them)."""
    if label_logq is not None:
        return label_logq.float()
    hit = indices == label[:, None]
    return torch.where(hit, logq, torch.full_like(logq, _NEG_INF)).amax(-1)
