"""backend="torch": the kernels' row-statistics contract written with PyTorch ops.

Same inputs, outputs and `row_stats` as `lpreg.kernels.token_stats` (see its header for the
math, and lpreg._contract for the layout, the ignored-row invariant and the logit transform, which
`scaled_rows` applies to every logits and proxy chunk it reads). It runs on
any device, processes rows in chunks (`lpreg._rows.row_chunks`) so that no more than a chunk
of fp32 temporaries (about 16 MiB each) is alive at once, and its backward writes the
gradient chunk by chunk. It is the portable fallback when neither Triton nor the compiled
extension can serve a tensor. The two halves of the row pass for vocabulary-parallel logits
(`token_stats_shard_pass1` / `_pass2`) return the partials of lpreg._contract.
"""

import torch

from . import _contract as layout
from ._rows import (
    dense_backward,
    finish_rows,
    forward_outputs,
    kept_cutoff,
    kept_mask,
    local_index,
    lse_and_entropy,
    masked_rows,
    row_chunks,
    scaled_rows,
    softmax_moments,
    upstream,
    valid_rows,
)

_NEG_INF = float("-inf")


def cross_term(e, y, x):
    """e (y - x), a kept token's share of the KL's cross term sum_K e^(y-my) (y - x): +inf
    where x = -inf, since q > 0 = p there makes KL(q || p) = +inf even when e = e^(y-my)
    underflows fp32 to 0 (0 * inf would be NaN). A NaN in x or y stays NaN."""
    return torch.where(x == _NEG_INF, torch.full_like(e, float("inf")), e * (y - x))


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, logit_scale=1.0,
                        logit_softcap=None):
    N, V = logits.shape
    out, row_stats = forward_outputs(logits, layout.TOKEN_STATS_WIDTH)
    for a, b in row_chunks(N, V):
        x = scaled_rows(logits[a:b], inv_temperature, logit_scale, logit_softcap)
        y = x if proxy is None else scaled_rows(proxy[a:b], inv_temperature, logit_scale, logit_softcap)
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
        valid = valid_rows(labels, a, b, ignore_index, x)
        label = x_label = y_label = None
        if labels is not None:
            label = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b])).long()
            x_label, y_label = x.gather(-1, label[:, None])[:, 0], y.gather(-1, label[:, None])[:, 0]
        outs, row_stats[a:b] = finish_rows(lse, entropy, lse_kept, cutoff, argmax_y, kl, bad, valid, label, x_label,
                                           y_label)
        for o, v in zip(out, outs):
            o[a:b] = v
    return out[0], out[1], out[2], out[3], row_stats


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index,
                         vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    V = logits.shape[1]

    def kl_term(a, b, valid, x, p, st):  # g_kl (p - q), q recomputed from the kept set of row_stats
        if g_kl is None:
            return None
        coef = upstream(g_kl, a, b, valid)
        y = x if proxy is None else masked_rows(proxy[a:b], valid, inv_temperature, logit_scale, logit_softcap)
        argmax_y, here = local_index(st[:, layout.ARGMAX].long(), vocab_offset, V)
        kept = kept_mask(y, st[:, layout.CUTOFF], torch.where(here, argmax_y, torch.full_like(argmax_y, -1)))
        q = torch.where(kept, (y - st[:, layout.LSE_KEPT, None]).exp(), torch.zeros_like(y))
        return coef[:, None] * (p - q)

    return dense_backward(logits, labels, row_stats, g_logp, g_entropy, inv_temperature, ignore_index, vocab_offset,
                          kl_term, logit_scale, logit_softcap)


# ---------------------------------------------------------------------------- vocabulary-parallel halves


def token_stats_shard_pass1(logits, labels, proxy, inv_temperature, fixed, ignore_index, logit_scale=1.0,
                            logit_softcap=None):
    """The shard's pass-1 partials (N, 7) fp32 (lpreg._contract.PASS1_SLOTS): max, sum and entropy
    moment of x, max of y, ("fixed") sum of y and first argmax (a local column), and the NaN / +inf
    flag. Ignored rows hold the neutral partials."""
    N, V = logits.shape
    out = torch.tensor(layout.NEUTRAL_PASS1, device=logits.device).repeat(N, 1)
    for a, b in row_chunks(N, V):
        x = scaled_rows(logits[a:b], inv_temperature, logit_scale, logit_softcap)
        m, _, s, t = softmax_moments(x)
        if proxy is None:
            y, my, sy = x, m, s
        else:
            y = scaled_rows(proxy[a:b], inv_temperature, logit_scale, logit_softcap)
            my = y.amax(-1)
            sy = torch.zeros_like(my)
            if fixed:
                sy = (y - torch.where(my == _NEG_INF, torch.zeros_like(my), my)[:, None]).exp().sum(-1)
        # amax propagates NaN; a +inf has no finite softmax
        bad = torch.isnan(m) | (m == float("inf")) | torch.isnan(my) | (my == float("inf"))
        argmax_y = torch.full_like(m, layout.NO_ARGMAX)
        if fixed:  # the first argmax; none in a shard without a finite entry (as the kernels)
            argmax_y = torch.where(my == _NEG_INF, argmax_y, y.argmax(-1).float())
        part = torch.stack([m, s, t, my, sy, argmax_y, bad.float()], -1)  # the PASS1_SLOTS order
        valid = valid_rows(labels, a, b, ignore_index, x)
        out[a:b] = torch.where(valid[:, None], part, out[a:b])
    return out


def token_stats_shard_pass2(logits, labels, proxy, inv_temperature, cutoff, my_ref, argmax_y, ignore_index,
                            logit_scale=1.0, logit_softcap=None):
    """The shard's pass-2 partials (N, 2) fp32 (lpreg._contract.PASS2_SLOTS) given the combined
    cutoff, max of y (as a reference, 0 for a bad row) and argmax (a local column, -1 when
    another shard holds it) of every row: the kept sum, and the cross term with a proxy."""
    N, V = logits.shape
    out = torch.zeros((N, layout.PASS2_WIDTH), dtype=torch.float32, device=logits.device)
    for a, b in row_chunks(N, V):
        x = scaled_rows(logits[a:b], inv_temperature, logit_scale, logit_softcap)
        y = x if proxy is None else scaled_rows(proxy[a:b], inv_temperature, logit_scale, logit_softcap)
        kept = kept_mask(y, cutoff[a:b], argmax_y[a:b])
        e = (y - my_ref[a:b, None]).exp()
        kept_sum = torch.where(kept, e, torch.zeros_like(e)).sum(-1)
        cross = torch.zeros_like(kept_sum)
        if proxy is not None:
            cross = torch.where(kept, cross_term(e, y, x), torch.zeros_like(e)).sum(-1)
        valid = valid_rows(labels, a, b, ignore_index, x)
        out[a:b] = torch.where(valid[:, None], torch.stack([kept_sum, cross], -1), torch.zeros_like(out[a:b]))
    return out
