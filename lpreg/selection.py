"""Which tokens Lp-Reg regularises: the rho-percentile of sampled-token probabilities (docs/spec.md §3).

The paper's set is the k = max(1, floor(rho * n)) tokens with the smallest p_y among the n
valid tokens of the whole step (every micro-batch of every data-parallel rank), ties broken
by position. Inside one call that is a stable sort of the call's log-probs
(`bottom_k_mask`). Across micro-batches and ranks it is `selection_threshold`: computed once
per step from the old policy's log-probs, it returns a threshold pair (log-prob, position)
that every later call applies to its own tokens with two comparisons, and the union of the
per-call selections is exactly the single-batch selection.

Global positions: a token's position is its flattened (B, L) index in its micro-batch, plus
the sizes of the micro-batches before it in the list passed on its rank, plus the sizes of
all micro-batches of lower ranks. Masked tokens count in positions (never in n), so the
order is fixed by the data layout alone and is the same on every rank.
"""

from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence, Tuple, Union, overload

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:  # torch.distributed may be a stub without ProcessGroup (torch built without it)
    from torch.distributed import ProcessGroup


@overload
def bottom_k_count(n: int, rho: float) -> int: ...
@overload
def bottom_k_count(n: Tensor, rho: float) -> Tensor: ...
def bottom_k_count(n: Union[int, Tensor], rho: float) -> Union[int, Tensor]:
    """k = max(1, floor(rho * n)); float64 product, the same as Python's int(n * rho).

    A tensor n gives a 0-d int64 tensor (no host sync); an int gives an int.
    """
    if isinstance(n, Tensor):
        return torch.clamp(torch.floor(n.double() * rho), min=1).long()
    return max(1, int(n * rho))


def bottom_k_mask(values: Tensor, valid: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
    """The k smallest `values` among `valid` entries, ties broken by position.

    values, valid: (N,); k: 0-d int64 tensor (no host sync). Returns (mask (N,) bool, kth
    value 0-d fp32: the k-th smallest valid value, +inf when there is no valid entry).
    """
    N = values.numel()
    inf = torch.tensor(float("inf"), device=values.device)
    if N == 0:
        return valid.clone(), inf
    key = torch.where(valid, values.float(), inf)
    # a stable sort keeps equal values in position order: the tie rule, exactly
    sorted_key, order = torch.sort(key, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(N, device=values.device)
    mask = valid & (rank < k)
    kth = sorted_key.gather(0, (k - 1).clamp(0, N - 1).reshape(1))[0]
    return mask, kth


class SelectionThreshold(NamedTuple):
    """The step-wide rho-percentile of old log-probs, for one micro-batch.

    A token at global position g with old log-prob v is in the lowest-rho set iff
    v < logp, or v == logp and g <= position (the first ties in position order).
    """

    logp: Tensor  # 0-d fp32: the k-th smallest old log-prob of the step (-inf: nothing valid)
    position: Tensor  # 0-d int64: global position of that k-th token (-1: nothing valid)
    offset: int  # global position of this micro-batch's first token
    k: int  # size of the step-wide set, max(1, floor(rho * n_valid)); 0 when n_valid = 0
    n_valid: int  # valid tokens in the whole step

    def mask(self, old_logp: Tensor, valid: Tensor) -> Tensor:
        """(B, L) bool: the tokens of this micro-batch that are in the step-wide set."""
        dev = old_logp.device
        pos = self.offset + torch.arange(old_logp.numel(), device=dev).reshape(old_logp.shape)
        v = old_logp.float()
        t = self.logp.to(dev)
        return valid & ((v < t) | ((v == t) & (pos <= self.position.to(dev))))


def _all_gather(t: Tensor, group: Optional["ProcessGroup"]) -> Tensor:
    """(W, *t.shape): t from every rank of `group`; (1, *t.shape) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return t[None]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _rank(group: Optional["ProcessGroup"]) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _as_list(x: Union[Tensor, Sequence[Tensor]], name: str) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(t, Tensor) for t in x):
        return list(x)
    raise ValueError(f"{name} must be a tensor or a list of tensors, got {type(x).__name__}")


def local_candidates(values: Tensor, valid: Tensor, k: int, offset: int) -> Tensor:
    """(k, 2) float64 (value, global position) pairs: this rank's k smallest valid values.

    Padded with (+inf, +inf). The step-wide k smallest are always among the union of every
    rank's k smallest, so gathering these (not all tokens) is exact.
    """
    key = torch.where(valid, values.float(), torch.tensor(float("inf"), device=values.device))
    sorted_key, order = torch.sort(key, stable=True)
    take = min(k, int(valid.sum()))
    out = torch.full((k, 2), float("inf"), dtype=torch.float64, device=values.device)
    out[:take, 0] = sorted_key[:take].double()  # fp32 -> fp64 is exact
    out[:take, 1] = (order[:take] + offset).double()  # exact below 2**53
    return out


def merge_candidates(cands: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """(..., 2) candidate pairs from every rank -> (logp 0-d fp32, position 0-d int64) of the k-th."""
    c = cands.reshape(-1, 2)
    c = c[torch.sort(c[:, 1], stable=True).indices]  # lexicographic order: position first,
    c = c[torch.sort(c[:, 0], stable=True).indices]  # then a stable sort by value
    kth = c[k - 1]
    return kth[0].float(), kth[1].long()


@overload
def selection_threshold(
    old_logp: Tensor,
    masks: Union[Tensor, Sequence[Tensor]],
    advantages: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    rho: float = 0.01,
    *,
    negative_only: bool = False,
    group: Optional["ProcessGroup"] = None,
) -> SelectionThreshold: ...
@overload
def selection_threshold(
    old_logp: Sequence[Tensor],
    masks: Union[Tensor, Sequence[Tensor]],
    advantages: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    rho: float = 0.01,
    *,
    negative_only: bool = False,
    group: Optional["ProcessGroup"] = None,
) -> List[SelectionThreshold]: ...
def selection_threshold(
    old_logp: Union[Tensor, Sequence[Tensor]],
    masks: Union[Tensor, Sequence[Tensor]],
    advantages: Optional[Union[Tensor, Sequence[Tensor]]] = None,
    rho: float = 0.01,
    *,
    negative_only: bool = False,
    group: Optional["ProcessGroup"] = None,
) -> Union[SelectionThreshold, List[SelectionThreshold]]:
    """The paper's step-wide lowest-rho set, exact across micro-batches and ranks.

    The set is chosen on the old policy's p_y: it is fixed for the whole step, so it cannot depend
    on how the step is split, and on-policy (one update per rollout) old and current p_y are equal.
    Pass each result to `lpreg_policy_loss(..., compat="paper", selection_threshold=...)` (the
    released form selects per call, as the released code does). Cost: one local stable sort of this
    rank's tokens; two all_gathers (2 int64 per rank, then k (value, position) pairs per rank, 16
    bytes each, with k = floor(rho * n_valid) of the whole step); a sort of W * k pairs; one host
    sync (k).

    Args:
        old_logp: (B, L) log-probs of the labels under the rollout policy, or a list of them (the
            micro-batches this rank will train on, in order).
        masks: The same shapes, > 0 where a token counts (one tensor, or one per micro-batch).
        advantages: (B, L) or (B,) per micro-batch, read only when `negative_only`.
        rho: The fraction of the step's valid tokens in the set, in (0, 1].
        negative_only: Whether the percentile is among the A < 0 tokens (the released code's
            population) rather than among all valid tokens.
        group: The torch.distributed process group (default: the world) when it is initialised;
            every rank must call this with its own micro-batches.

    Returns:
        One SelectionThreshold per micro-batch (a list), or a single one for a tensor old_logp.

    Raises:
        ValueError: A shape, a count of micro-batches or rho is invalid (the message names it).
    """
    olds = _as_list(old_logp, "old_logp")
    ms = _as_list(masks, "masks")
    if len(ms) != len(olds):
        raise ValueError(f"masks must hold one tensor per old_logp tensor ({len(olds)}), got {len(ms)}")
    if not (0 < float(rho) <= 1):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    advs = None
    if negative_only:
        if advantages is None:
            raise ValueError("advantages must be given when negative_only=True, got None")
        advs = _as_list(advantages, "advantages")
    valids: List[Tensor] = []
    for i, (o, m) in enumerate(zip(olds, ms)):
        if m.shape != o.shape:
            raise ValueError(f"masks[{i}] must have the shape of old_logp[{i}] {tuple(o.shape)}, got {tuple(m.shape)}")
        v = m > 0
        if advs is not None:
            a = advs[i]
            a = a[:, None].expand(o.shape) if a.dim() == 1 and o.dim() == 2 else a
            if a.shape != o.shape:
                raise ValueError(f"advantages[{i}] must be (B, L) or (B,) for old_logp {tuple(o.shape)}, "
                                 f"got {tuple(advs[i].shape)}")
            v = v & (a < 0)
        valids.append(v.reshape(-1))
    dev = olds[0].device
    values = torch.cat([o.detach().float().reshape(-1) for o in olds])
    valid = torch.cat(valids)
    # round 1: sizes and valid counts of every rank -> this rank's offset and the global k
    counts = _all_gather(torch.tensor([values.numel(), int(valid.sum())], device=dev), group).cpu()
    rank = _rank(group)
    rank_offset = int(counts[:rank, 0].sum())
    n_valid = int(counts[:, 1].sum())
    offsets: List[int] = []
    off = rank_offset
    for o in olds:
        offsets.append(off)
        off += o.numel()
    if n_valid == 0:
        empty = (torch.tensor(float("-inf"), device=dev), torch.tensor(-1, device=dev))  # selects nothing
        out = [SelectionThreshold(*empty, offset=o, k=0, n_valid=0) for o in offsets]
    else:
        k = bottom_k_count(n_valid, float(rho))
        # round 2: the k smallest (value, position) pairs of every rank, then the k-th of all
        cands = _all_gather(local_candidates(values, valid, k, rank_offset), group)
        t, pos = merge_candidates(cands, k)
        out = [SelectionThreshold(t, pos, offset=o, k=k, n_valid=n_valid) for o in offsets]
    return out[0] if isinstance(old_logp, Tensor) else out
