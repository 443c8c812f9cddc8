"""backend="torch": the kernels' row-statistics contract written with PyTorch ops.

Same inputs, outputs and `row_stats` as `lpreg.kernels.token_stats` (see its header for the
math, and lpreg._contract for the layout and the ignored-row invariant). It runs on
any device, processes rows in chunks (`lpreg._rows.row_chunks`) so that no more than a chunk
of fp32 temporaries (about 16 MiB each) is alive at once, and its backward writes the
gradient chunk by chunk. It is the portable fallback when neither Triton nor the compiled
extension can serve a tensor.
"""

import torch

from . import _contract as layout
from ._rows import entropy_term, kept_cutoff, kept_mask, lse_and_entropy, masked_rows, row_chunks, upstream, valid_rows

_NEG_INF = float("-inf")


def cross_term(e, y, x):
    """e (y - x), a kept token's share of the KL's cross term sum_K e^(y-my) (y - x): +inf
    where x = -inf, since q > 0 = p there makes KL(q || p) = +inf even when e = e^(y-my)
    underflows fp32 to 0 (0 * inf would be NaN). A NaN in x or y stays NaN."""
    return torch.where(x == _NEG_INF, torch.full_like(e, float("inf")), e * (y - x))


def _stats_row(lse, entropy, lse_kept, cutoff, argmax_y):
    """Stack per-row vectors into row_stats columns, in the layout's slot order."""
    cols = [None] * layout.TOKEN_STATS_WIDTH
    cols[layout.LSE], cols[layout.ENTROPY], cols[layout.LSE_KEPT] = lse, entropy, lse_kept
    cols[layout.CUTOFF], cols[layout.ARGMAX] = cutoff, argmax_y.float()
    return torch.stack(cols, -1)


def ignored_row_stats(n, width, device):
    """Row statistics of ignored rows (the ignored-row invariant): zeros, argmax -1."""
    stats = torch.zeros((n, width), dtype=torch.float32, device=device)
    if width > layout.ARGMAX:
        stats[:, layout.ARGMAX] = layout.NO_ARGMAX
    return stats


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index):
    N, V = logits.shape
    dev = logits.device
    out = [torch.zeros((N,), dtype=torch.float32, device=dev) for _ in range(4)]
    row_stats = torch.zeros((N, layout.TOKEN_STATS_WIDTH), dtype=torch.float32, device=dev)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        y = x if proxy is None else proxy[a:b].float() * inv_temperature
        m, lse, entropy = lse_and_entropy(x)
        my, my_ref, ey, cutoff, argmax_y = kept_cutoff(y, fixed, log_threshold)
        kept = kept_mask(y, cutoff, argmax_y)
        kept_sum = torch.where(kept, ey, torch.zeros_like(ey)).sum(-1)
        lse_kept = my_ref + kept_sum.log()
        if proxy is None:
            kl = torch.log1p(torch.where(kept, torch.zeros_like(ey), ey).sum(-1) / kept_sum)
        else:
            cross = torch.where(kept, cross_term(ey, y, x), torch.zeros_like(ey)).sum(-1)
            kl = cross / kept_sum + lse - lse_kept
        del ey, kept
        # amax propagates NaN: a NaN, a +inf or only -inf in x or y makes its max non-finite
        bad = ~torch.isfinite(m) | ~torch.isfinite(my)
        nan = torch.full_like(lse, float("nan"))
        if labels is not None:
            lab = labels[a:b]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab)).long()[:, None]
            x_lab = x.gather(-1, safe)[:, 0]
            y_lab = y.gather(-1, safe)[:, 0]
            logp = x_lab - lse
            lab_kept = (y_lab >= cutoff) | (safe[:, 0] == argmax_y)
            proxy_logp = torch.where(lab_kept, y_lab - lse_kept, torch.full_like(lse, _NEG_INF))
        else:
            valid = torch.ones_like(bad)
            logp = torch.zeros_like(lse)
            proxy_logp = torch.zeros_like(lse)
        cols = [logp, proxy_logp, kl, entropy]
        for i, v in enumerate(cols):
            v = torch.where(bad, nan, v)
            out[i][a:b] = torch.where(valid, v, torch.zeros_like(v))
        stats = _stats_row(torch.where(bad, nan, lse), entropy, lse_kept, cutoff, argmax_y)
        ignored = ignored_row_stats(b - a, layout.TOKEN_STATS_WIDTH, dev)
        row_stats[a:b] = torch.where(valid[:, None], stats, ignored)
    return out[0], out[1], out[2], out[3], row_stats


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index):
    N, V = logits.shape
    grad = torch.empty_like(logits)
    for a, b in row_chunks(N, V):
        valid = valid_rows(labels, a, b, ignore_index, logits)
        x = masked_rows(logits[a:b], valid, inv_temperature)
        st = torch.where(valid[:, None], row_stats[a:b], torch.zeros_like(row_stats[a:b]))
        lse, entropy, lse_kept = st[:, layout.LSE], st[:, layout.ENTROPY], st[:, layout.LSE_KEPT]
        cutoff, argmax_y = st[:, layout.CUTOFF], st[:, layout.ARGMAX].long()
        logp = x - lse[:, None]
        p = logp.exp()
        g = torch.zeros_like(x)
        if g_logp is not None:
            coef = upstream(g_logp, a, b, valid)
            g -= coef[:, None] * p
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b])).long()[:, None]
            g.scatter_add_(-1, safe, coef[:, None])
        if g_kl is not None:
            coef = upstream(g_kl, a, b, valid)
            y = x if proxy is None else masked_rows(proxy[a:b], valid, inv_temperature)
            kept = kept_mask(y, cutoff, argmax_y)
            q = torch.where(kept, (y - lse_kept[:, None]).exp(), torch.zeros_like(y))
            g += coef[:, None] * (p - q)
        if g_entropy is not None:
            g -= upstream(g_entropy, a, b, valid)[:, None] * entropy_term(p, logp, entropy)
        grad[a:b] = (g * inv_temperature).to(grad.dtype)
    return grad
