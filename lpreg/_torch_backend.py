"""backend="torch": the kernels' row-statistics contract written with PyTorch ops.

Same inputs, outputs and `row_stats` as `lpreg.kernels.token_stats` (see its header for the
math). It runs on any device, processes rows in chunks so that no more than a chunk of
fp32 temporaries (about 16 MiB each) is alive at once, and its backward writes the
gradient chunk by chunk. It is the portable fallback when neither Triton nor the compiled
extension can serve a tensor.
"""

import torch

_CHUNK_ELEMENTS = 1 << 22


def row_chunks(N, V):
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, N, step):
        yield start, min(N, start + step)


def lse_and_entropy(x):
    """Rows of x: (max, logsumexp, entropy), with H = log s - t/s, s = sum e^(x-m),
    t = sum e^(x-m)(x-m); -inf entries contribute nothing (0 log 0 = 0)."""
    m = x.amax(-1)
    m_ref = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    d = x - m_ref[:, None]
    e = d.exp()
    s = e.sum(-1)
    t = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(-1)
    return m, m_ref + s.log(), s.log() - t / s


def _kept_mask(y, cutoff, argmax_y):
    cols = torch.arange(y.shape[-1], device=y.device)
    return (y >= cutoff[:, None]) | (cols[None, :] == argmax_y[:, None])


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index):
    N, V = logits.shape
    dev = logits.device
    out = [torch.zeros((N,), dtype=torch.float32, device=dev) for _ in range(4)]
    row_stats = torch.zeros((N, 5), dtype=torch.float32, device=dev)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        y = x if proxy is None else proxy[a:b].float() * inv_temperature
        m, lse, entropy = lse_and_entropy(x)
        my = y.amax(-1)
        my_ref = torch.where(my == float("-inf"), torch.zeros_like(my), my)
        ey = (y - my_ref[:, None]).exp()
        if fixed:
            lse_y = my_ref + ey.sum(-1).log()
            cutoff = lse_y + log_threshold
            cutoff = torch.where(my < cutoff, torch.full_like(cutoff, float("inf")), cutoff)
            argmax_y = y.argmax(-1)  # first maximum, as the kernels
        else:
            cutoff = my + log_threshold
            argmax_y = torch.full_like(my, -1, dtype=torch.long)
        kept = _kept_mask(y, cutoff, argmax_y)
        kept_sum = torch.where(kept, ey, torch.zeros_like(ey)).sum(-1)
        lse_kept = my_ref + kept_sum.log()
        if proxy is None:
            kl = torch.log1p(torch.where(kept, torch.zeros_like(ey), ey).sum(-1) / kept_sum)
        else:
            cross = torch.where(kept, ey * (y - x), torch.zeros_like(ey)).sum(-1)
            kl = cross / kept_sum + lse - lse_kept
        del ey, kept
        bad = torch.isnan(x).any(-1) | torch.isnan(y).any(-1) | (m == float("-inf")) | (my == float("-inf"))
        nan = torch.full_like(lse, float("nan"))
        if labels is not None:
            lab = labels[a:b]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab)).long()[:, None]
            x_lab = x.gather(-1, safe)[:, 0]
            y_lab = y.gather(-1, safe)[:, 0]
            logp = x_lab - lse
            lab_kept = (y_lab >= cutoff) | (safe[:, 0] == argmax_y)
            proxy_logp = torch.where(lab_kept, y_lab - lse_kept, torch.full_like(lse, float("-inf")))
        else:
            valid = torch.ones_like(bad)
            logp = torch.zeros_like(lse)
            proxy_logp = torch.zeros_like(lse)
        cols = [logp, proxy_logp, kl, entropy]
        for i, v in enumerate(cols):
            v = torch.where(bad, nan, v)
            out[i][a:b] = torch.where(valid, v, torch.zeros_like(v))
        stats = torch.stack([torch.where(bad, nan, lse), entropy, lse_kept, cutoff, argmax_y.float()], -1)
        row_stats[a:b] = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return out[0], out[1], out[2], out[3], row_stats


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index):
    N, V = logits.shape
    grad = torch.empty_like(logits)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        lse, entropy, lse_kept, cutoff, argmax_y = row_stats[a:b].unbind(-1)
        valid = torch.ones_like(lse, dtype=torch.bool)
        if labels is not None:
            valid = labels[a:b] != ignore_index
        lse = torch.where(valid, lse, torch.zeros_like(lse))
        logp = x - lse[:, None]
        p = logp.exp()
        g = torch.zeros_like(x)
        if g_logp is not None:
            coef = torch.where(valid, g_logp[a:b].float(), torch.zeros_like(lse))
            g -= coef[:, None] * p
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b])).long()[:, None]
            g.scatter_add_(-1, safe, coef[:, None])
        if g_kl is not None:
            coef = torch.where(valid, g_kl[a:b].float(), torch.zeros_like(lse))
            y = x if proxy is None else proxy[a:b].float() * inv_temperature
            kept = _kept_mask(y, cutoff, argmax_y.long())
            q = torch.where(kept, (y - lse_kept[:, None]).exp(), torch.zeros_like(y))
            g += coef[:, None] * (p - q)
        if g_entropy is not None:
            coef = torch.where(valid, g_entropy[a:b].float(), torch.zeros_like(lse))
            plogp = torch.where(x == float("-inf"), torch.zeros_like(p), p * (logp + entropy[:, None]))
            g -= coef[:, None] * plogp
        grad[a:b] = (g * inv_temperature).to(grad.dtype)
    return grad
