"""Lp-Reg over any base objective (docs/spec.md, "Lp-Reg over any base objective"), and the mechanism's metrics.

`lpreg_regularize` adds Lp-Reg to a per-token base loss the caller computed with its own objective
(PPO-clip, CISPO, SAPO, ...). Per valid token t:

    paper:    loss_t = base_t + beta S_t D_t
    released: loss_t = (S_t ? surrogate_t : base_t) + beta S_t D_t

where surrogate_t is the raw-ratio surrogate -A r_t with the base's upper caps (dual clip, TRL's
`delta`): a selected token (always A < 0) is no longer held by the lower clip or a soft gate. lpreg's own
losses are this over the PPO-clip base (lpreg._loss_terms.token_terms runs the same code).

`mechanism_sums` reduces the per-token result to sums and counts that add across micro-batches and
ranks; `mechanism_metrics` turns pooled sums into the logged values (docs/spec.md §3a: the push of a
selected token is about 1/m - 1 per unit of negative advantage, m the proxy's kept mass there).
"""

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from . import _loss_terms as core
from ._loss_terms import LOG_RATIO_CLAMP, LossTerms
from .loss_config import LossConfig
from .selection import SelectionThreshold

__all__ = ["LossTerms", "lpreg_regularize", "mechanism_sums", "mechanism_metrics"]


def _check_per_token(name: str, t: Optional[Tensor], B: int, L: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float torch.Tensor of shape (B, L), "
                         f"got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != (B, L):
        raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def lpreg_regularize(
    base_loss: Tensor,
    stats: Sequence[Tensor],
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    released_surrogate: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    compat: str = "released",
    rho: float = 0.01,
    beta: float = 1.0,
    kl_estimator: Optional[str] = None,
) -> LossTerms:
    """Lp-Reg on top of a base objective's per-token loss (docs/spec.md, "Lp-Reg over any base objective").

    The selection is lpreg's (docs/spec.md §3): released, the k = int(rho n_neg) lowest p_y among this
    call's A < 0 tokens (none when k <= 1) whose sampled token the proxy keeps above the policy; paper,
    the k = max(1, floor(rho n)) lowest p_y of the pool, A < 0, kept by the proxy. Aggregate
    `terms.loss` as the base objective aggregates its per-token loss.

    Args:
        base_loss: (B, L) the base objective's per-token loss (differentiable), importance-sampling
            weights and masks already applied as the base applies them.
        stats: A `TokenStats` (logp, proxy_logp, kl, entropy) of (B, L) tensors at the policy's
            temperature and filter (see `lpreg.policy_loss_from_stats`); entries where
            response_mask is 0 are never read.
        advantages: (B, L) or (B,) advantages A.
        old_logp: (B, L) rollout log-probs of the labels, or None for on-policy (stats.logp,
            detached: the ratio is exactly 1).
        response_mask: (B, L), > 0 where a token counts.
        released_surrogate: (B, L) the loss a selected token trains on in the released form: the
            raw-ratio surrogate -A r with the base's upper caps (dual clip, TRL's `delta`) and its
            weights. None: -A r (r = exp(logp - old_logp), log r clamped to [-20, 20]) times
            `weights` when given, which is right for a base with no upper cap. Not read by the
            paper form.
        weights: None, or (B, L) or (B,) per-token weights >= 0 (an importance-sampling mask, the
            off-policy mask, the 80/20 mask): a token of weight 0 is outside the selection pool.
            They do not multiply base_loss (the caller's base applied them already).
        selection_threshold: compat="paper" only: a `SelectionThreshold` (the step-wide
            percentile, exact across micro-batches and ranks), or None to select within this call.
        compat: "released" (the authors' code, the default) or "paper" (Eq. 6 as written).
        rho: The fraction of lowest-probability tokens eligible for the penalty, in (0, 1].
        beta: The penalty's weight, >= 0 (0: loss = base_loss exactly, nothing is a candidate).
        kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".

    Returns:
        LossTerms of (B, L) tensors: loss, base_loss, candidate, selected, divergence, filtered,
        kept_mass and p_y (see `LossTerms`); every field is 0 (False; NaN for kept_mass) where the
        token does not count.

    Raises:
        LossConfigError: An option is out of range (a ValueError naming the option).
        ValueError: An input has the wrong type, shape, dtype or device.
    """
    cfg = LossConfig(compat=compat, rho=rho, beta=beta, kl_estimator=kl_estimator)
    B, L = core.check_stats(stats)
    device = stats[0].device
    core.check_selection_threshold(selection_threshold, cfg)
    _check_per_token("base_loss", base_loss, B, L, device)
    _check_per_token("released_surrogate", released_surrogate, B, L, device)
    batch = core.prepare((B, L), device, None, advantages, old_logp, response_mask, cfg, weights=weights)
    flat = core.flat_stats(stats, batch)
    bottom, _ = core.global_selection(batch, flat.logp.detach(), cfg, selection_threshold)
    keep = lambda t: torch.where(batch.valid, t.reshape(-1).float(), 0.0)  # noqa: E731
    if released_surrogate is not None:
        surrogate = keep(released_surrogate)
    else:  # the raw-ratio surrogate -A r, as lpreg's own loss computes it (lpreg._loss_terms.token_terms)
        old = flat.logp.detach() if batch.on_policy else batch.old_logp
        surrogate = -batch.adv * torch.exp((flat.logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        if batch.is_weight is not None:
            surrogate = surrogate * batch.is_weight
    out = core.regularize_terms(keep(base_loss), surrogate, flat.logp, flat.proxy_logp, flat.kl, batch.adv,
                                 batch.valid, bottom, cfg)
    return LossTerms(*(t.reshape(B, L) for t in out))


def mechanism_sums(terms: LossTerms, valid: Tensor) -> Dict[str, Tensor]:
    """The mechanism's sums and counts over the `valid` tokens, additive across micro-batches and ranks.

    Args:
        terms: A `LossTerms` (from `lpreg_regularize`, or a loss core of the same fields).
        valid: A mask of the fields' shape, bool or > 0 where a token counts.

    Returns:
        0-d fp32 tensors: "candidates" (the lowest-rho set's size), "filtered" (the candidates whose
        sampled token the proxy filters out), "selected" (S_t's count), and over the selected
        tokens "kept_mass" (sum of m), "push" (sum of 1/m - 1) and "p_y" (sum of p_y). Add them (or
        all_reduce with SUM) over micro-batches and ranks, then call `mechanism_metrics`.

    Raises:
        ValueError: `valid` is not a tensor of the fields' shape.
    """
    if not isinstance(terms, LossTerms):
        raise ValueError(f"terms must be a LossTerms, got {type(terms).__name__}")
    if not isinstance(valid, Tensor) or tuple(valid.shape) != tuple(terms.loss.shape):
        raise ValueError(f"valid must be a tensor of shape {tuple(terms.loss.shape)}, "
                         f"got {tuple(getattr(valid, 'shape', ())) or type(valid).__name__}")
    mask = valid if valid.dtype == torch.bool else valid > 0
    return core.mechanism_sums(terms, mask.to(terms.loss.device))


def mechanism_metrics(sums: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The mechanism's metrics from (pooled) `mechanism_sums`: exact ratios of the pooled sums.

    Args:
        sums: The dict of `mechanism_sums`, or its sum over micro-batches and ranks.

    Returns:
        0-d tensors: "lpreg_candidates" (count), "lpreg_filtered_frac" (filtered / candidates, 0
        with no candidate), "lpreg_selected" (count), and the means over the selected tokens (0 when
        none) "lpreg_kept_mass" (m), "lpreg_push" (1/m - 1) and "lpreg_p_y".

    Raises:
        ValueError: A key of `mechanism_sums` is missing.
    """
    missing = [key for key in core.MECHANISM_KEYS if key not in sums]
    if missing:
        raise ValueError(f"sums must hold the keys of mechanism_sums {core.MECHANISM_KEYS}, missing {missing}")
    return core.mechanism_metrics(sums)
