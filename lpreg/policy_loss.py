"""The Lp-Reg policy loss (docs/spec.md §3): `lpreg_policy_loss` from logits, `policy_loss_from_stats`
from per-token statistics the caller already has. Released-code and paper forms.

Per valid token t with advantage A, ratio r = exp(logp - old_logp):

    loss_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta S_t D_t

released (default, docs/spec.md §3a): the k = max(1, int(rho n_neg)) smallest p_y among the
          call's A < 0 tokens, none when k <= 1; S_t also needs logp < proxy_logp; D_t = k3
          at the sampled token; and a selected token's surrogate is the unclipped -A r. (The
          released code's topk leaves ties unspecified; here they are broken by position.)
paper:    S_t = [p_y among the k = max(1, floor(rho n)) smallest of the n valid tokens, ties
          by position] & [A < 0] & [y in K];  D_t = D_KL(q || p) over the vocabulary ("full").

Why released is the default: on-policy, the full KL's gradient (p - q)/T raises the selected
token by only p_y (1/m - 1) (m: the kept mass) and lowers p_y itself when a leader holds most
of the mass, while k3 raises y's logit by (1/m - 1)(1 - p_y); docs/loss_forms.md derives both.

The options (compat, rho, beta, clips, ...) are the fields of `lpreg.LossConfig`, written once
there and validated once per call; the building blocks are in lpreg._loss_terms (shared with
lpreg.fused_linear). Every per-token quantity comes from one fused pass over the logits
(`lpreg_token_stats`, or the sparse-proxy op), so the loss and every metric cost one read of
N x V forward and one read + one write backward. The selection is a stable sort of N log-probs,
no host sync.

On-policy (`old_logp=None`): old_logp is this pass's detached logp, so r = 1 exactly (its
gradient is still d logp), the selection uses the current log-probs, and no extra forward
pass is needed. `num_tokens`: the global valid-token count (all micro-batches and ranks) as
the token-mean denominator, so the per-call losses sum to the global token-mean.
"""

from typing import TYPE_CHECKING, Any, Dict, Literal, Optional, Sequence, Tuple, Union, overload

import torch
from torch import Tensor

from . import _loss_terms as terms
from . import _validate
from .loss_config import STATS_OPTIONS, LossConfig, loss_options
from .selection import SelectionThreshold
from .sparse_proxy import SparseProxy
from .token_stats import TokenStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["lpreg_policy_loss", "policy_loss_from_stats"]

# python floats, or 0-d tensors with return_tensors=True
Metrics = Union[Dict[str, float], Dict[str, Tensor]]
Proxy = Union[None, Tensor, SparseProxy]


# the overloads give the metrics' type from `return_tensors` (python floats by default)
@overload
def policy_loss_from_stats(
    stats: Sequence[Tensor], advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: Literal[False] = ..., **options: Any,
) -> Tuple[Tensor, Dict[str, float]]: ...
@overload
def policy_loss_from_stats(
    stats: Sequence[Tensor], advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: Literal[True], **options: Any,
) -> Tuple[Tensor, Dict[str, Tensor]]: ...
@overload
def policy_loss_from_stats(
    stats: Sequence[Tensor], advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: bool, **options: Any,
) -> Tuple[Tensor, Metrics]: ...
@loss_options(excluded=STATS_OPTIONS)
def policy_loss_from_stats(
    stats: Sequence[Tensor],
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    selection_threshold: Optional[SelectionThreshold] = None,
    num_tokens: terms.NumTokens = None,
    weights: Optional[Tensor] = None,
    return_tensors: bool = False,
    **options: Any,
) -> Tuple[Tensor, Metrics]:
    """The Lp-Reg policy loss from per-token statistics the caller already has.

    stats: a `TokenStats` (logp, proxy_logp, kl, entropy), each (B, L) float, e.g. from
        `lpreg_token_stats` or a framework's own forward at its temperature and filter:
        logp = log p_y (differentiable), proxy_logp = log q_y or -inf when y was filtered
        (a target: detached here), kl = D_KL(q || p) (read only when the estimator is
        "full"; pass zeros for k3), entropy = H(p) (a metric only, detached here).
        Entries where response_mask is 0 are never read, whatever they hold (NaN included).
        Statistics of vocabulary-parallel logits (`lpreg_token_stats(..., process_group=...)`)
        are whole-row values, the same on every rank: they go in as they are, no group needed.
    advantages: (B, L) or (B,); response_mask: (B, L), > 0 where a token counts.
    old_logp: (B, L) rollout log-probs of the labels, or None for on-policy: old_logp is
        stats.logp detached (ratio exactly 1, no extra forward) and selection uses it.
    num_tokens: None, or the global number of valid tokens (int or 0-d tensor, >= 0) over
        every micro-batch and rank, the token-mean denominator (loss_agg_mode "token-mean"
        only), so that the per-call losses add up to the global token-mean. Metrics stay
        means over this call's tokens; actor/pg_loss is the returned loss. A tensor costs
        one host sync (its value is checked); an int none.
    weights: None, or per-token importance-sampling weights w (B, L) or (B,) (one per sequence),
        e.g. TIS's truncated or MIS's masked rollout-to-trainer ratios; detached, finite and >= 0
        on the valid tokens (one host sync checks it). The rule (docs/spec.md §3, "Per-token
        weights"): w multiplies the surrogate, dual clip included, and not the Lp-Reg term
        beta S_t D_t; a w = 0 token is out of the selection pool (it neither counts in rho's
        population nor can be selected; with a `selection_threshold`, build it from masks
        that exclude those tokens too); the aggregation's denominators and the metrics are
        unweighted.
    options: the `LossConfig` fields (compat, rho, beta, clip_low, clip_high, clip_ratio_c,
        loss_agg_mode, kl_estimator) as in `lpreg_policy_loss`; temperature, mode, threshold,
        ignore_index and backend describe how the statistics were made and do not apply.

    Returns (loss 0-d fp32, metrics), exactly what `lpreg_policy_loss` returns for logits
    whose statistics are `stats`.
    """
    cfg = LossConfig.from_options(options, excluded=STATS_OPTIONS)
    B, L = terms.check_stats(stats)
    terms.check_selection_threshold(selection_threshold, cfg)
    batch = terms.prepare((B, L), stats[0].device, None, advantages, old_logp, response_mask, cfg,
                          num_tokens=num_tokens, weights=weights)
    logp, proxy_logp, kl, entropy = (t.reshape(-1).float() for t in stats)
    # masked entries never reach the loss, its gradient or a metric (a NaN there stays out)
    keep = lambda t: torch.where(batch.valid, t, 0.0)  # noqa: E731
    flat = TokenStats(keep(logp), keep(proxy_logp.detach()), keep(kl), keep(entropy.detach()))
    loss, metrics = terms.loss_from_flat(flat, batch, cfg, selection_threshold)
    return loss, (metrics if return_tensors else terms.to_floats(metrics))


@overload
def lpreg_policy_loss(
    logits: Tensor, labels: Tensor, advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    proxy: Proxy = ..., selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: Literal[False] = ...,
    process_group: Optional["ProcessGroup"] = ..., **options: Any,
) -> Tuple[Tensor, Dict[str, float]]: ...
@overload
def lpreg_policy_loss(
    logits: Tensor, labels: Tensor, advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    proxy: Proxy = ..., selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: Literal[True],
    process_group: Optional["ProcessGroup"] = ..., **options: Any,
) -> Tuple[Tensor, Dict[str, Tensor]]: ...
@overload
def lpreg_policy_loss(
    logits: Tensor, labels: Tensor, advantages: Tensor, old_logp: Optional[Tensor], response_mask: Tensor, *,
    proxy: Proxy = ..., selection_threshold: Optional[SelectionThreshold] = ..., num_tokens: terms.NumTokens = ...,
    weights: Optional[Tensor] = ..., return_tensors: bool,
    process_group: Optional["ProcessGroup"] = ..., **options: Any,
) -> Tuple[Tensor, Metrics]: ...
@loss_options()
def lpreg_policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    proxy: Proxy = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    num_tokens: terms.NumTokens = None,
    weights: Optional[Tensor] = None,
    return_tensors: bool = False,
    process_group: Optional["ProcessGroup"] = None,
    **options: Any,
) -> Tuple[Tensor, Metrics]:
    """Lp-Reg GRPO policy loss; returns (loss 0-d fp32, metrics dict).

    logits: (B, L, V) current policy, any float dtype (accumulated in fp32); labels: (B, L)
    sampled tokens; advantages: (B, L) or (B,); old_logp: (B, L) rollout log-probs of the
    labels, or None for on-policy (this pass's log-probs, detached: ratio exactly 1, no
    extra forward); response_mask: (B, L), > 0 where a token counts (a label equal to
    ignore_index never counts). An all-zero mask gives loss 0 and a zero gradient.

    options: the fields of `lpreg.LossConfig`, validated once:
        compat: "released" (default: the form that produced the paper's results, docs/spec.md
            §3a) or "paper" (the literal Eq. 6); the module docstring lists every difference.
        temperature, mode ("min_p" | "fixed"), threshold: the policy's T and the proxy's filter.
        rho, beta: the selected fraction and the penalty's weight (beta = 0: Lp-Reg off).
        clip_low, clip_high: the ratio clip (default [0, 10]); clip_ratio_c: verl's dual clip
            (None: off).
        loss_agg_mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum".
        kl_estimator: None picks "k3" (released) / "full" (paper).
        ignore_index, backend ("auto" | "triton" | "torch" | "cpu" | "cuda").
    proxy: None (on-policy: the current logits, detached), dense (B, L, V) logits of the
        rollout policy, or a `SparseProxy` from `lpreg.build_proxy`.
    selection_threshold: paper only. None selects on the current p_y within this call (the
        paper's definition when the call holds the whole step). A `SelectionThreshold` from
        `lpreg.selection_threshold` selects on old_logp with the step-wide percentile, exact
        across micro-batches and ranks; on-policy the two choices agree.
    num_tokens: the global valid-token count for loss_agg_mode="token-mean" (see
        `policy_loss_from_stats`); None: this call's count.
    weights: per-token importance-sampling weights (see `policy_loss_from_stats`), or None.
    return_tensors: False gives python floats (one host sync for all of them); True gives
        0-d tensors and no sync, for callers that accumulate over micro-batches.
    process_group: None, or the tensor-parallel group over which the vocabulary is sharded:
        logits (and a dense proxy) are then this rank's (B, L, V_r) block (`lpreg_token_stats`
        says which), everything else is the same on every rank, and so are the loss and the
        metrics; the backward gives this shard's gradient. A data-parallel split is the caller's,
        as without it (num_tokens, and `selection_threshold(..., group=<data-parallel group>)`).

    Metrics: actor/pg_loss (the returned loss), actor/lpreg_kl (mean D over selected tokens),
    actor/lpreg_frac (selected / valid), actor/lpreg_threshold (p at the rho-percentile),
    actor/entropy, actor/ppo_kl (mean old_logp - logp), actor/pg_clipfrac, and
    actor/pg_clipfrac_lower (the dual clip's share; 0 without clip_ratio_c).
    """
    cfg = LossConfig.from_options(options)
    _validate.check_logits(logits, allow_empty=process_group is not None)  # a vocabulary shard may be empty
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, L, V), got {tuple(logits.shape)}")
    terms.check_selection_threshold(selection_threshold, cfg)
    B, L, V = logits.shape
    terms.check_proxy(proxy, (B, L), V, logits.device)
    batch = terms.prepare((B, L), logits.device, labels, advantages, old_logp, response_mask, cfg,
                          num_tokens=num_tokens, weights=weights)
    # labels are ignore_index off the valid tokens, so every statistic there is exactly 0
    assert batch.labels is not None  # prepare() was given labels
    stats = terms.compute_token_stats(logits.reshape(B * L, V), batch.labels, terms.flat_proxy(proxy, B * L, V), cfg,
                                      process_group)
    loss, metrics = terms.loss_from_flat(stats, batch, cfg, selection_threshold)
    return loss, (metrics if return_tensors else terms.to_floats(metrics))
