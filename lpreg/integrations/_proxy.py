"""The rollout-time proxy of the adapters: which policy q comes from, and how it is recorded.

Lp-Reg's proxy q (docs/spec.md §1) must come from the policy that generated the data. With
one optimiser step per rollout that is the current policy (detached), and nothing has to be
stored. With several steps per rollout (TRL: `num_iterations > 1`, or a generation batch
spanning several optimiser steps; verl: several mini-batches or PPO epochs), every step
after the first trains on data the current policy did not generate, so q is recorded at the
forward that produces the old log-probs and kept with the batch, as the released recipes do
(`minp_old_log_prob=True`).

What is recorded depends on the divergence D_t the loss reads:
    k3 (compat="released" default)   log q(y) per token: `lpreg_rollout_logq` (B, L) fp32,
                                     -inf where y is outside the kept set K
    full KL (compat="paper" default) the sparse top-k record of q (`lpreg.build_proxy`, with
                                     the label's exact log q): indices (B, L, k) int32,
                                     log q (B, L, k) and coverage (B, L), fp32
Cost: no extra forward (the old-log-prob forward already reads the logits); per response token
4 bytes for k3, 8k + 8 bytes for the sparse record (k = 64: 520 bytes). verl's engine emits the
record for response tokens only, in old_log_probs' jagged layout (`_verl_engine.to_response_layout`).

Which policy q comes from in verl's asynchronous trainers (docs/spec.md, "The rollout record in
verl's trainers"): the record is taken in the same forward as old_log_probs, the proximal policy
pi_old of decoupled PPO; in the one-step-off-policy, fully-asynchronous and v1 asynchronous trainers
that is the trainer's recomputation, not the (up to several versions older) policy whose rollout
engine sampled the tokens.
"""

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .._fused_linear_chunks import ChunkMatmuls
from ..fused_linear import default_chunk_size
from ..logit_transform import LogitTransform
from ..sparse_proxy import SparseProxy, build_proxy
from ..token_stats import TokenStats, lpreg_token_stats

PROXY_SOURCES = ("rollout", "current")
ROLLOUT_LOGQ = "lpreg_rollout_logq"
SPARSE_KEYS = ("lpreg_proxy_indices", "lpreg_proxy_logq", "lpreg_proxy_coverage")
DEFAULT_TOPK = 64


def check_source(value: Optional[str], name: str) -> Optional[str]:
    """None (auto: rollout when the update is off-policy), "rollout" or "current"."""
    if value is not None and value not in PROXY_SOURCES:
        raise ValueError(f"{name} must be None (auto), 'rollout' or 'current', got {value!r}")
    return value


def check_topk(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def use_rollout(source: Optional[str], off_policy: bool) -> bool:
    """Whether the loss reads a proxy recorded at rollout time."""
    return source == "rollout" or (source is None and off_policy)


@torch.no_grad()
def record(logits: Tensor, labels: Tensor, *, temperature: float, mode: str, threshold: float,
           sparse: bool, topk: int, ignore_index: int = -100,
           transform: Optional[Dict[str, Any]] = None) -> Dict[str, Tensor]:
    """The rollout record of rows of logits: (n, V), labels (n,) -> {key: (n,) or (n, k)}.

    `transform`: the ops' logit_scale / logit_softcap keywords (CONTRACT A) when `logits` are the raw
    h @ W.T of a model that scales or soft-caps them; None or {} for logits as the model returns them.
    Also returns "logp" and "entropy" (n,) of the same logits: the old log-probs of this forward.
    """
    tf = transform or {}
    stats = lpreg_token_stats(logits, labels, temperature=temperature, mode=mode, threshold=threshold,
                              ignore_index=ignore_index, **tf)
    out = {"logp": stats.logp, "entropy": stats.entropy, ROLLOUT_LOGQ: stats.proxy_logp}
    if sparse:
        p = build_proxy(logits, labels, temperature=temperature, mode=mode, threshold=threshold, k=topk,
                        ignore_index=ignore_index, **tf)
        out.update(zip(SPARSE_KEYS, (p.indices, p.logq, p.coverage)))
    return out


@torch.no_grad()
def record_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                  chunk_size: Optional[int], transform: Optional[LogitTransform] = None, **kw) -> Dict[str, Tensor]:
    """`record` of the logits hidden (n, H) @ weight.T + bias, a chunk of rows at a time (the fused
    paths: no (n, V) logits), each chunk one product of the fused paths' own (`lpreg._fused_linear_chunks`):
    fp32 logits whatever autocast region this runs in, so the old log-probs recorded here are those
    the fused training forward computes. transform: the head's logit transform (scaled / soft-capped
    heads, lpreg.logit_transform), applied to each chunk's logits; None: plain logits. kw: record's
    keywords. Returns {key: (n,) or (n, k)}."""
    n = hidden.shape[0]
    mm = ChunkMatmuls(hidden, weight, bias, False, False, False)
    step = chunk_size or default_chunk_size(n, weight.shape[0], hidden.device)
    tf = (lambda x: x) if transform is None else transform.apply  # noqa: E731
    parts = [record(tf(mm.logits(slice(a, a + step))), labels[a:a + step], **kw) for a in range(0, max(n, 1), step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def sparse_proxy(batch: Dict[str, Tensor]) -> Optional[SparseProxy]:
    """The SparseProxy stored in a batch (its label log q is the stored rollout log q(y))."""
    if SPARSE_KEYS[0] not in batch or batch[SPARSE_KEYS[0]] is None:
        return None
    idx, logq, cov = (batch[k] for k in SPARSE_KEYS)
    return SparseProxy(idx, logq, cov, batch[ROLLOUT_LOGQ].float())


def with_rollout_logq(stats: TokenStats, rollout_logq: Tensor) -> TokenStats:
    """k3 statistics against the rollout proxy: log q(y) recorded at rollout time replaces
    the current one. `kl` (the full KL against the current q) is not read by k3; it is zeroed
    so that no statistic of the wrong policy reaches the loss."""
    zero = torch.zeros_like(stats.kl)
    return TokenStats(stats.logp, rollout_logq.to(stats.proxy_logp), zero, stats.entropy)
