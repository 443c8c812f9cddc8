"""Vocabulary-parallel rows: the shard layout, the two collectives, and how the ranks' partials of a
row combine (docs/spec.md §6). The op glue calls this with the backend module that computes each
shard's partials; nothing here reads a whole row.

Layout. Every rank of `process_group` holds the same rows and a contiguous block of the vocabulary:
rank r holds the columns [r W, r W + V_r), where W is rank 0's width and every shard is W wide but
the last non-empty one, which may be narrower (torch.chunk's layout: DTensor's Shard(-1), Megatron's
and flash-attention's when W divides V). The offset comes from the rank and the width, as in
flash-attention's cross-entropy; the last rank learns W from the first collective. Everything else
(labels, a SparseProxy with its global indices, advantages, masks) is the same on every rank.

A forward is two all_gathers, whatever the number of rows:
  1. each rank's pass-1 partials, (N, 7) fp32 (lpreg._contract.PASS1_SLOTS), plus its width;
     every rank merges them -> lse, H, and each row's kept-set cutoff and argmax;
  2. what needs those: the kept sums of pass 2, the label's logits (from the rank that holds the
     label), the sparse proxy's KL terms, build_proxy's top-k candidates -> summed or merged.
Every rank reduces the same gathered bytes with the same ops, so every rank holds bitwise the same
statistics, and with them the same loss, selection and upstream gradients (an all_reduce does not
promise bitwise-equal results on every rank). The backward needs no collective: a shard's gradient
needs only the combined row statistics the forward saved, that shard and the upstream gradients.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _contract as c
from . import _validate
from ._rows import (
    finish_rows,
    kept_mask,
    local_index,
    mask_outputs,
    row_chunks,
    scaled_rows,
    sparse_kl,
    sparse_proxy_logp,
)

_NEG_INF = float("-inf")
# global columns travel as fp32 (the argmax slot, build_proxy's candidates): exact below 2^24
MAX_VOCAB = 1 << 24


class Shard(NamedTuple):
    """This rank's block of the vocabulary: columns [offset, offset + width) of `vocab`."""

    rank: int
    size: int
    block: int  # W, the width of every shard but the last non-empty one: rank r starts at r W
    offset: int
    width: int
    vocab: int


def check_group(process_group) -> None:
    """process_group must be a live torch.distributed group (ValueError otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"process_group needs torch.distributed to be initialised (init_process_group), "
                         f"got process_group={process_group!r}")
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                         f"got {type(process_group).__name__}")


def gather(t: Tensor, group) -> Tensor:
    """(ranks, *t.shape): t from every rank of `group`, in rank order (one all_gather)."""
    size = dist.get_world_size(group)
    out = t.new_empty((size * t.shape[0], *t.shape[1:]))
    # all_gather_single is all_gather_into_tensor's name from torch 2.13 on, which deprecates the old one
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(out, t.contiguous(), group=group)
    return out.reshape(size, *t.shape)


def shard_layout(widths, rank: int) -> Shard:
    """The Shard of `rank` from every rank's width; ValueError unless the layout is torch.chunk's.
    Every rank sees the same widths, so every rank raises alike (no rank is left in a collective)."""
    W, V = widths[0], sum(widths)
    want = [min(W, max(0, V - r * W)) for r in range(len(widths))]
    if widths != want:
        raise ValueError(f"logits must be sharded over the vocabulary in contiguous blocks, rank r holding columns "
                         f"[r * W, r * W + width_r) with every width W but the last ones ({want} for V = {V}), "
                         f"got widths {widths} on the ranks of process_group")
    if not 0 < V < MAX_VOCAB:
        raise ValueError(f"the vocabulary sharded over process_group must hold 1 to {MAX_VOCAB - 1} columns, got {V}")
    return Shard(rank, len(widths), W, rank * W, widths[rank], V)


def vocab_shard(width: int, device, group) -> Shard:
    """This rank's Shard from one all_gather of the ranks' widths (for a caller that needs the layout
    before any row is read: the fused linear paths size their chunks alike on every rank)."""
    widths = gather(torch.tensor([width], dtype=torch.int64, device=device), group)
    return shard_layout([int(w) for w in widths.reshape(-1).tolist()], dist.get_rank(group))


def gather_pass1(part: Tensor, width: int, group):
    """Collective 1: every rank's pass-1 partials (N, 7) and width -> ((ranks, N, 7), this Shard).
    The width rides in one extra row: no separate collective."""
    extra = part.new_zeros((1, part.shape[1]))
    extra[0, 0] = width
    parts = gather(torch.cat([part, extra]), group)
    widths = [int(w) for w in parts[:, -1, 0].tolist()]  # one host sync: the offsets index memory
    return parts[:, :-1], shard_layout(widths, dist.get_rank(group))


def sum_over_ranks(t: Tensor, group) -> Tensor:
    """Collective 2: the sum of t over the ranks, reduced on every rank in rank order."""
    return gather(t, group).sum(0)


class Rows(NamedTuple):
    """Per row, combined over the shards (each (N,) fp32; argmax_y int64)."""

    lse: Tensor
    entropy: Tensor
    s: Tensor  # sum e^(x - m_ref): on-policy, kl = log(s / kept sum)
    my_ref: Tensor  # max of y, 0 for a bad row: the reference of the kept sums
    cutoff: Tensor  # y_i >= cutoff keeps column i
    argmax_y: Tensor  # the first argmax of y, a global column ("fixed"; -1 otherwise and on bad rows)
    bad: Tensor  # bool: a NaN or +inf on some shard, or no finite entry on any


def _merge(m_r: Tensor, s_r: Tensor, t_r=None):
    """(m, m_ref, s, t) of rows from the shards' (m_r, s_r, t_r), each (ranks, N), all relative to
    their own max: s = sum_r s_r e^(m_r - m), t = sum_r e^(m_r - m) (t_r + s_r (m_r - m)) (a shard
    with no finite entry adds 0; t_r is its entropy moment)."""
    m = m_r.amax(0)
    m_ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = m_r - m_ref
    scale = d.exp()
    s = (s_r * scale).sum(0)
    t = None
    if t_r is not None:
        t = (scale * (t_r + torch.where(s_r > 0, s_r * d, torch.zeros_like(d)))).sum(0)
    return m, m_ref, s, t


def merge_pass1(parts: Tensor, shard: Shard, fixed: bool, log_threshold: float) -> Rows:
    """Combine the gathered pass-1 partials (ranks, N, 7) into each row's statistics (docs/spec.md §6)."""
    m, m_ref, s, t = _merge(parts[..., c.PART_MAX], parts[..., c.PART_SUM], parts[..., c.PART_MOMENT])
    my_r = parts[..., c.PART_MAX_Y]
    my, my_ref, sy, _ = _merge(my_r, parts[..., c.PART_SUM_Y])
    bad = (parts[..., c.PART_BAD].sum(0) > 0) | ~torch.isfinite(m) | ~torch.isfinite(my)
    log_s = s.log()
    if fixed:
        cutoff = my + sy.log() + log_threshold
        cutoff = torch.where(my < cutoff, torch.full_like(cutoff, float("inf")), cutoff)  # K = {first argmax}
        # the first argmax: the lowest-ranked shard whose max is the row's, at its own first argmax
        offsets = torch.arange(shard.size, device=parts.device)[:, None] * shard.block
        local = parts[..., c.PART_ARGMAX_Y].long()
        cand = torch.where((my_r == my) & (local >= 0), local + offsets, torch.full_like(local, MAX_VOCAB))
        argmax_y = cand.amin(0)
        argmax_y = torch.where(bad | (argmax_y == MAX_VOCAB), torch.full_like(argmax_y, c.NO_ARGMAX), argmax_y)
    else:
        cutoff = my + log_threshold
        argmax_y = torch.full_like(m, c.NO_ARGMAX, dtype=torch.long)
    return Rows(m_ref + log_s, log_s - t / s, s, torch.where(bad, torch.zeros_like(my_ref), my_ref), cutoff,
                argmax_y, bad)


def _neutral_pass1(N: int, device) -> Tensor:
    return torch.tensor(c.NEUTRAL_PASS1, device=device).repeat(N, 1)


def _at_labels(t: Tensor, labels, shard: Shard, inv_temperature: float, ignore_index: int, logit_scale: float = 1.0,
               logit_softcap: Optional[float] = None) -> Tensor:
    """(N,) fp32: t[row, label] / T on the rank whose shard holds the label, 0 on the others and on
    ignored rows, so that the sum over the ranks is the label's scaled logit."""
    if shard.width == 0:
        return torch.zeros((t.shape[0],), dtype=torch.float32, device=t.device)
    col, here = local_index(labels, shard.offset, shard.width)
    value = scaled_rows(t.gather(1, col[:, None])[:, 0], inv_temperature, logit_scale, logit_softcap)
    return torch.where(here & (labels != ignore_index), value, torch.zeros_like(value))


def _first_pass(impl, logits, labels, proxy, inv_temperature, fixed, ignore_index, group, logit_scale=1.0,
                logit_softcap=None):
    """Pass 1 on this shard, collective 1, and the layout checks -> ((ranks, N, 7), Shard)."""
    N, width = logits.shape
    part = (impl.token_stats_shard_pass1(logits, labels, proxy, inv_temperature, fixed, ignore_index,
                                             logit_scale=logit_scale, logit_softcap=logit_softcap) if width
            else _neutral_pass1(N, logits.device))
    parts, shard = gather_pass1(part, width, group)
    if labels is not None:
        _validate.check_label_range(labels, shard.vocab, ignore_index)
    return parts, shard


def token_stats_forward(impl, logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, group,
                        logit_scale=1.0, logit_softcap=None):
    """The token-stats forward on this rank's shard (N, V_r): the four (N,) outputs and row_stats
    (N, 5), the same bits on every rank, and the Shard. `impl` is the backend module."""
    parts, shard = _first_pass(impl, logits, labels, proxy, inv_temperature, fixed, ignore_index, group, logit_scale,
                               logit_softcap)
    rows = merge_pass1(parts, shard, fixed, log_threshold)
    col, here = local_index(rows.argmax_y, shard.offset, shard.width)
    argmax_local = torch.where(here, col, torch.full_like(col, c.NO_ARGMAX))
    if shard.width:
        part = impl.token_stats_shard_pass2(logits, labels, proxy, inv_temperature, rows.cutoff, rows.my_ref,
                                            argmax_local, ignore_index, logit_scale=logit_scale,
                                            logit_softcap=logit_softcap)
    else:
        part = logits.new_zeros((logits.shape[0], c.PASS2_WIDTH), dtype=torch.float32)
    cols = [part[:, c.PART_KEPT], part[:, c.PART_CROSS]]
    if labels is not None:
        cols.append(_at_labels(logits, labels, shard, inv_temperature, ignore_index, logit_scale, logit_softcap))
        cols.append(cols[-1] if proxy is None else _at_labels(proxy, labels, shard, inv_temperature, ignore_index,
                                                              logit_scale, logit_softcap))
    total = sum_over_ranks(torch.stack(cols, -1), group)
    kept, cross = total[:, 0], total[:, 1]
    lse_kept = rows.my_ref + kept.log()
    if proxy is None:  # kl = lse - lse_K = log(s / kept), >= 0 up to rounding (K in the row)
        kl = (rows.s / kept).log().clamp(min=0.0)
    else:
        kl = cross / kept + rows.lse - lse_kept
    valid = torch.ones_like(rows.bad) if labels is None else labels != ignore_index
    label = None if labels is None else torch.where(valid, labels, torch.zeros_like(labels))
    outs, row_stats = finish_rows(rows.lse, rows.entropy, lse_kept, rows.cutoff, rows.argmax_y, kl, rows.bad, valid,
                                  label, *((None, None) if labels is None else (total[:, 2], total[:, 3])))
    return (*outs, row_stats), shard


def sparse_proxy_forward(impl, logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, group,
                         logit_scale=1.0, logit_softcap=None):
    """Statistics against a sparse proxy whose indices are global columns: the four (N,) outputs,
    row_stats (N, 2) and the Shard. Pass 1 is the token-stats one (x's max, sum and moment); the k
    entries are gathered where they live, and their KL terms and the label's logit summed."""
    parts, shard = _first_pass(impl, logits, labels, None, inv_temperature, False, ignore_index, group, logit_scale,
                               logit_softcap)
    _validate.check_index_range(indices, shard.vocab, "proxy.indices")
    rows = merge_pass1(parts, shard, False, 0.0)
    col, here = local_index(indices, shard.offset, shard.width)
    lq = logq.float()
    kl_part = torch.zeros_like(rows.lse)
    if shard.width:
        x_idx = scaled_rows(logits.gather(1, col), inv_temperature, logit_scale, logit_softcap)
        kl_part = sparse_kl(x_idx, lq, rows.lse, here)
    cols = [kl_part] + ([] if labels is None else [_at_labels(logits, labels, shard, inv_temperature, ignore_index,
                                                              logit_scale, logit_softcap)])
    total = sum_over_ranks(torch.stack(cols, -1), group)
    valid = torch.ones_like(rows.bad) if labels is None else labels != ignore_index
    logp = proxy_logp = torch.zeros_like(rows.lse)
    if labels is not None:
        logp = total[:, 1] - rows.lse
        proxy_logp = sparse_proxy_logp(torch.where(valid, labels, torch.zeros_like(labels)), indices, lq, label_logq)
    outs = mask_outputs((logp, proxy_logp, total[:, 0], rows.entropy), rows.bad, valid)
    stats = [None] * c.SPARSE_PROXY_WIDTH
    stats[c.LSE] = torch.where(rows.bad, torch.full_like(rows.lse, float("nan")), rows.lse)
    stats[c.ENTROPY] = rows.entropy
    row_stats = torch.where(valid[:, None], torch.stack(stats, -1), torch.zeros((), device=logits.device))
    return (*outs, row_stats), shard


def build_proxy(impl, logits, labels, inv_temperature, fixed, log_threshold, k, ignore_index, group, logit_scale=1.0,
                logit_softcap=None):
    """`build_proxy_rows` on vocabulary-parallel logits: (indices (N, k) int32 global columns, logq
    (N, k), coverage (N,), label_logq (N,) or None), the same on every rank. Collective 2 gathers
    each shard's k largest kept entries (and its kept sum, kept count and the label's logit); every
    rank keeps the k largest of the ranks x k candidates."""
    N, width = logits.shape
    parts, shard = _first_pass(impl, logits, None, None, inv_temperature, fixed, ignore_index, group, logit_scale,
                               logit_softcap)
    if labels is not None:
        _validate.check_label_range(labels, shard.vocab, ignore_index)
    rows = merge_pass1(parts, shard, fixed, log_threshold)
    col, here = local_index(rows.argmax_y, shard.offset, shard.width)
    argmax_local = torch.where(here, col, torch.full_like(col, c.NO_ARGMAX))
    kk = min(k, width)
    # per row: k candidate values (y on kept columns, -inf padding), their global columns, then the
    # kept sum e^(y - my), the kept count and the label's y
    cand = torch.full((N, 2 * k + 3), _NEG_INF, dtype=torch.float32, device=logits.device)
    cand[:, k:] = 0.0
    for a, b in row_chunks(N, max(width, 1)):
        if not width:
            break
        y = scaled_rows(logits[a:b], inv_temperature, logit_scale, logit_softcap)
        kept = kept_mask(y, rows.cutoff[a:b], argmax_local[a:b])
        vals, top = torch.topk(torch.where(kept, y, torch.full_like(y, _NEG_INF)), kk, dim=-1)
        cand[a:b, :kk] = vals
        cand[a:b, k:k + kk] = (top + shard.offset).float()
        e = (y - rows.my_ref[a:b, None]).exp()
        cand[a:b, 2 * k] = torch.where(kept, e, torch.zeros_like(e)).sum(-1)
        cand[a:b, 2 * k + 1] = kept.sum(-1).float()
    if labels is not None:
        cand[:, 2 * k + 2] = _at_labels(logits, labels, shard, inv_temperature, ignore_index, logit_scale,
                                        logit_softcap)
    every = gather(cand, group)  # (ranks, N, 2k + 3)
    vals = every[..., :k].permute(1, 0, 2).reshape(N, -1)
    cols = every[..., k:2 * k].permute(1, 0, 2).reshape(N, -1)
    # the k largest of the ranks x k candidates, the real columns before the padding at equal values
    # (-inf): a stable sort by value after placing the padding last, so that the captured columns
    # are distinct whenever k <= V, as torch.topk's over a whole row
    real = torch.cat([torch.arange(k, device=logits.device) < min(k, w) for w in _widths(shard)])
    perm = torch.argsort((~real).to(torch.uint8), stable=True)
    vals, cols = vals[:, perm], cols[:, perm]
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    k_all = min(k, shard.vocab)
    top_vals, top_cols = vals.gather(1, order[:, :k_all]), cols.gather(1, order[:, :k_all]).long()
    kept_sum, kept_count, y_label = every[..., 2 * k].sum(0), every[..., 2 * k + 1].sum(0), every[..., 2 * k + 2].sum(0)
    lse_kept = rows.my_ref + kept_sum.log()
    lse_cap = torch.logsumexp(top_vals, -1)
    nan = torch.full_like(lse_cap, float("nan"))
    indices = torch.zeros((N, k), dtype=torch.int32, device=logits.device)
    logq = torch.full((N, k), _NEG_INF, dtype=torch.float32, device=logits.device)
    indices[:, :k_all] = top_cols.to(torch.int32)
    logq[:, :k_all] = top_vals - lse_cap[:, None]
    logq = torch.where(rows.bad[:, None], nan[:, None], logq)
    # every kept entry captured: exactly 1 (the two sums differ only in summation order)
    coverage = torch.where(kept_count <= k_all, torch.ones_like(lse_cap), torch.exp(lse_cap - lse_kept))
    coverage = torch.where(rows.bad, nan, coverage)
    label_logq = None
    if labels is not None:
        valid = labels != ignore_index
        label_kept = (y_label >= rows.cutoff) | (labels == rows.argmax_y)
        exact = torch.where(label_kept, y_label - lse_kept, torch.full_like(lse_kept, _NEG_INF))
        label_logq = torch.where(valid, torch.where(rows.bad, nan, exact), torch.zeros_like(exact))
    return indices, logq, coverage, label_logq


def _widths(shard: Shard):
    """Every rank's width, from the layout (shard_layout checked it)."""
    return [min(shard.block, max(0, shard.vocab - r * shard.block)) for r in range(shard.size)]


def collective_bytes(rows: int, ranks: int, op: str, *, labels: bool = True, k: int = 0):
    """(sent, received): the bytes one rank sends and receives in the two all_gathers of one forward
    of `op` ("token_stats", "sparse_proxy" or "build_proxy") over `rows` rows (fp32 payloads; the
    same with and without a dense proxy). The backward sends nothing."""
    first = (rows + 1) * c.PASS1_WIDTH * 4  # the partials, and the width in one extra row
    per_row = {"token_stats": c.PASS2_WIDTH + (2 if labels else 0), "sparse_proxy": 1 + (1 if labels else 0),
               "build_proxy": 2 * k + 3}[op]
    sent = first + rows * per_row * 4
    return sent, (ranks - 1) * sent
