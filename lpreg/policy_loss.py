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

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

from torch import Tensor

from . import _loss_terms as terms
from . import _validate
from .loss_config import LossConfig
from .selection import SelectionThreshold
from .sparse_proxy import SparseProxy

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["lpreg_policy_loss", "policy_loss_from_stats"]

# python floats (the default), or 0-d tensors with return_tensors=True
Metrics = Dict[str, Any]
Proxy = Union[None, Tensor, SparseProxy]


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
    compat: str = "released",
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    kl_estimator: Optional[str] = None,
) -> Tuple[Tensor, Metrics]:
    """The Lp-Reg policy loss from per-token statistics the caller already has.

    Exactly what `lpreg_policy_loss` returns for logits whose statistics are `stats`. The options
    that describe how the statistics were made (temperature, mode, threshold, ignore_index,
    backend, logit_scale, logit_softcap) do not apply here.

    Args:
        stats: A `TokenStats` (logp, proxy_logp, kl, entropy), each (B, L) float, e.g. from
            `lpreg_token_stats` or a framework's own forward at its temperature and filter:
            logp = log p_y (differentiable), proxy_logp = log q_y or -inf when y was filtered (a
            target: detached here), kl = D_KL(q || p) (read only when the estimator is "full";
            pass zeros for k3), entropy = H(p) (a metric only, detached here). Entries where
            response_mask is 0 are never read, whatever they hold (NaN included). Statistics of
            vocabulary-parallel logits are whole-row values, the same on every rank: they go in
            as they are, no group needed.
        advantages: (B, L) or (B,) advantages A.
        old_logp: (B, L) rollout log-probs of the labels, or None for on-policy: old_logp is
            stats.logp detached (ratio exactly 1, no extra forward) and selection uses it.
        response_mask: (B, L), > 0 where a token counts.
        selection_threshold: compat="paper" only: a `SelectionThreshold` from
            `lpreg.selection_threshold` (the step-wide percentile, exact across micro-batches and
            ranks), or None to select within this call.
        num_tokens: None, or the global number of valid tokens (int or 0-d tensor, >= 0) over every
            micro-batch and rank, the token-mean denominator (loss_agg_mode "token-mean" only), so
            that the per-call losses add up to the global token-mean. Metrics stay means over this
            call's tokens. A tensor costs one host sync (its value is checked); an int none.
        weights: None, or per-token importance-sampling weights w, (B, L) or (B,) (one per
            sequence), detached, finite and >= 0 on the valid tokens (one host sync checks it). The
            rule (docs/spec.md §3, "Per-token weights"): w multiplies the surrogate, dual clip
            included, not the Lp-Reg term; a w = 0 token is out of the selection pool; the
            aggregation's denominators and the metrics are unweighted.
        return_tensors: False gives python floats (one host sync for all of them); True gives 0-d
            tensors and no sync, for callers that accumulate over micro-batches.
        compat: "released" (the authors' code, the default) or "paper" (Eq. 6 as written).
        rho: The fraction of lowest-probability tokens eligible for the penalty, in (0, 1].
        beta: The penalty's weight, >= 0 (0 turns Lp-Reg off: the plain clipped surrogate).
        clip_low: The ratio clip's lower width: r >= 1 - clip_low.
        clip_high: The ratio clip's upper width: r <= 1 + clip_high.
        clip_ratio_c: None, or verl's dual clip (> 1): an A < 0 token's surrogate is at most -A c.
        loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".

    Returns:
        (loss, metrics): the 0-d fp32 loss and the metrics of `lpreg_policy_loss`.

    Raises:
        LossConfigError: An option is out of range (a ValueError naming the option).
        ValueError: An input has the wrong type, shape, dtype or device.
    """
    cfg = LossConfig(compat=compat, rho=rho, beta=beta, clip_low=clip_low, clip_high=clip_high,
                     clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode, kl_estimator=kl_estimator)
    B, L = terms.check_stats(stats)
    terms.check_selection_threshold(selection_threshold, cfg)
    batch = terms.prepare((B, L), stats[0].device, None, advantages, old_logp, response_mask, cfg,
                          num_tokens=num_tokens, weights=weights)
    flat = terms.flat_stats(stats, batch)
    loss, metrics = terms.loss_from_flat(flat, batch, cfg, selection_threshold)
    return loss, (metrics if return_tensors else terms.to_floats(metrics))


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
    compat: str = "released",
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    kl_estimator: Optional[str] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """The Lp-Reg GRPO policy loss from logits (docs/spec.md §3).

    The options are the fields of `lpreg.LossConfig`, validated once per call. Every per-token
    quantity comes from one fused pass over the logits; the selection is a stable sort of the N
    log-probs, with no host sync.

    Args:
        logits: (B, L, V) logits of the current policy, any float dtype (accumulated in fp32).
        labels: (B, L) sampled tokens; a label equal to ignore_index never counts.
        advantages: (B, L) or (B,) advantages A.
        old_logp: (B, L) rollout log-probs of the labels, or None for on-policy (this pass's
            log-probs, detached: ratio exactly 1, no extra forward).
        response_mask: (B, L), > 0 where a token counts. An all-zero mask gives loss 0 and a zero
            gradient.
        proxy: None (on-policy: the current logits, detached), dense (B, L, V) logits of the
            rollout policy, or a `SparseProxy` from `lpreg.build_proxy`.
        selection_threshold: compat="paper" only. None selects on the current p_y within this call
            (the paper's definition when the call holds the whole step); a `SelectionThreshold`
            from `lpreg.selection_threshold` selects on old_logp with the step-wide percentile,
            exact across micro-batches and ranks.
        num_tokens: None (this call's count), or the global valid-token count for
            loss_agg_mode="token-mean" (see `policy_loss_from_stats`).
        weights: None, or per-token importance-sampling weights (see `policy_loss_from_stats`).
        return_tensors: False gives python floats (one host sync for all of them); True gives 0-d
            tensors and no sync, for callers that accumulate over micro-batches.
        process_group: None, or the tensor-parallel group over which the vocabulary is sharded:
            logits (and a dense proxy) are then this rank's (B, L, V_r) block; the loss and metrics
            are the same on every rank, and the backward gives this shard's gradient.
        compat: "released" (the default: the form that produced the paper's results, docs/spec.md
            §3a) or "paper" (the literal Eq. 6).
        temperature: The policy's sampling temperature T (> 0).
        mode: The proxy's noise filter, "min_p" or "fixed".
        threshold: The filter's threshold (kappa).
        rho: The fraction of lowest-probability tokens eligible for the penalty, in (0, 1].
        beta: The penalty's weight, >= 0 (0 turns Lp-Reg off: the plain clipped surrogate).
        clip_low: The ratio clip's lower width: r >= 1 - clip_low (default: the paper's [0, 10]).
        clip_high: The ratio clip's upper width: r <= 1 + clip_high.
        clip_ratio_c: None, or verl's dual clip (> 1): an A < 0 token's surrogate is at most -A c.
        loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".
        ignore_index: The label value that never counts.
        backend: The token-statistics backend: "auto", "triton", "torch", "cpu" or "cuda".
        logit_scale: The LM head's logit multiplier, applied to the logits before the temperature
            (Cohere, Granite, MiniCPM); finite and > 0.
        logit_softcap: None, or the LM head's tanh soft-cap c (Gemma): z = c tanh(logit_scale x / c).

    Returns:
        (loss, metrics). loss: 0-d fp32. metrics (python floats, or 0-d tensors with
        return_tensors=True): actor/pg_loss (the returned loss), actor/lpreg_kl (mean D over the
        selected tokens), actor/lpreg_frac (selected / valid), actor/lpreg_threshold (p at the
        rho-percentile), actor/entropy, actor/ppo_kl (mean old_logp - logp), actor/pg_clipfrac,
        actor/pg_clipfrac_lower (the dual clip's share); and the mechanism (`lpreg.mechanism_metrics`):
        actor/lpreg_candidates, actor/lpreg_filtered_frac, actor/lpreg_selected,
        actor/lpreg_kept_mass, actor/lpreg_push (mean 1/m - 1), actor/lpreg_p_y.

    Raises:
        LossConfigError: An option is out of range (a ValueError naming the option).
        ValueError: An input has the wrong type, shape, dtype or device.
    """
    cfg = LossConfig(compat=compat, temperature=temperature, mode=mode, threshold=threshold, rho=rho, beta=beta,
                     clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
                     kl_estimator=kl_estimator, ignore_index=ignore_index, backend=backend,
                     logit_scale=logit_scale, logit_softcap=logit_softcap)
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
