"""TRL 1.16's GRPO objectives as Lp-Reg composes with them (docs/spec.md, "Lp-Reg over any base objective").

TRL computes the base loss itself (`GRPOTrainer._compute_loss`, every loss_type and option); the
adapter adds, per token t, the Lp-Reg difference and aggregates it exactly as TRL aggregates its own
per-token loss (every aggregation below is linear in the per-token loss, so
TRL's loss + aggregate(extra) = aggregate(TRL's per-token loss + extra)):

    paper     extra_t = beta S_t D_t
    released  extra_t = S_t w_t (surrogate_t - base_t) + beta S_t D_t

with w_t TRL's vLLM importance-sampling weight where TRL multiplies the loss by it. The released
swap needs TRL's per-token base loss, which TRL does not expose: `token_base_loss` re-implements it
(token-level ratios only) and tests/integrations/test_trl_losses.py pins it to TRL's own loss.

Released surrogates (a selected token always has A < 0):
    grpo, bnpo, dr_grpo, dapo   -A min(r, delta) (the raw ratio, TRL's upper cap delta kept)
    sapo                        -A r (the soft gate removed)
    cispo                       the base itself: CISPO never zeroes a negative-advantage gradient, and
                                its cap min(r, epsilon_high) is an upper cap, kept
Sequence-ratio objectives (importance_sampling_level="sequence" (GSPO), luspo, vespo) have no token
ratio to un-clip: `released_refusal` names the option.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["LOSS_TYPES", "SEQUENCE_RATIO_LOSS_TYPES", "released_refusal", "token_base_loss", "released_surrogate",
           "aggregate", "is_weighted"]

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SEQUENCE_RATIO_LOSS_TYPES = ("luspo", "vespo")
_PPO_CLIP = ("grpo", "bnpo", "dr_grpo", "dapo")


def released_refusal(loss_type: str, importance_sampling_level: str) -> Optional[str]:
    """The message refusing lpreg_compat="released" over a sequence-ratio objective, or None."""
    if importance_sampling_level == "sequence":
        return ("lpreg_compat='released' swaps a selected token's clipped loss for the raw token ratio -A r, but "
                "importance_sampling_level='sequence' (GSPO) has one ratio per sequence and no token ratio to "
                "un-clip; use lpreg_compat='paper' (TRL's loss + beta S D) or importance_sampling_level='token'")
    if loss_type in SEQUENCE_RATIO_LOSS_TYPES:
        return (f"lpreg_compat='released' swaps a selected token's clipped loss for the raw token ratio -A r, but "
                f"loss_type={loss_type!r} weights each sequence by a sequence-level ratio, with no token ratio to "
                f"un-clip; use lpreg_compat='paper' (TRL's loss + beta S D)")
    return None


def is_weighted(loss_type: str) -> bool:
    """Whether TRL multiplies this loss type's per-token loss by the vLLM importance-sampling ratio (every
    loss type but vespo, which folds the ratio into its sequence weight)."""
    return loss_type != "vespo"


def token_base_loss(loss_type: str, logp: Tensor, old_logp: Tensor, adv: Tensor, *, epsilon_low: float,
                    epsilon_high: float, delta: Optional[float], sapo_temperature_pos: float,
                    sapo_temperature_neg: float) -> Tensor:
    """TRL 1.16's per-token loss of a token-level loss type (`GRPOTrainer._compute_loss`, before its masks,
    weights and reference KL), transcribed: r = exp(logp - old_logp) (TRL clamps no log-ratio).

    Args:
        loss_type: one of grpo, bnpo, dr_grpo, dapo, sapo, cispo.
        logp: (B, C) current log-probs (differentiable).
        old_logp: (B, C) old log-probs (detached; logp.detach() on-policy, as TRL).
        adv: (B, C) or (B, 1) advantages.
        epsilon_low: TRL's epsilon (the lower clip).
        epsilon_high: TRL's epsilon_high (the upper clip; CISPO's cap).
        delta: TRL's two-sided clip's upper bound on r, or None.
        sapo_temperature_pos: SAPO's gate temperature for A > 0.
        sapo_temperature_neg: SAPO's gate temperature for A <= 0.

    Returns:
        (B, C) fp32 per-token loss.

    Raises:
        ValueError: a loss type with no token-level base here (luspo, vespo, unknown).
    """
    coef_1 = torch.exp(logp - old_logp)
    if loss_type in _PPO_CLIP:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        return -torch.min(coef_1 * adv, coef_2 * adv)
    if loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        return -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    if loss_type == "cispo":
        return -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logp
    raise ValueError(f"loss_type={loss_type!r} has no token-level base loss here (one of "
                     f"{_PPO_CLIP + ('sapo', 'cispo')})")


def released_surrogate(loss_type: str, logp: Tensor, old_logp: Tensor, adv: Tensor, base: Tensor, *,
                       delta: Optional[float]) -> Tensor:
    """The released form's loss at a selected token (see the module docstring), before TRL's weights.

    The log-ratio is clamped to [-20, 20] (an overflowing r would meet a zero gradient as 0 * inf = NaN;
    a selected token's r is within it in any run that trains).
    """
    if loss_type == "cispo":
        return base
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    if loss_type in _PPO_CLIP and delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -adv * ratio


def aggregate(per_token: Tensor, mask: Tensor, *, loss_type: str, max_completion_length: int,
              normalizer: Optional[Tensor] = None) -> Tensor:
    """TRL 1.16's aggregation of a per-token loss for `loss_type`: TRL's `policy_loss` (the value its
    _compute_loss returns times the gradient-accumulation steps, except for cispo / dapo / vespo, whose
    normalizer already spans one accumulation window).

    Args:
        per_token: (B, C) per-token loss.
        mask: (B, C) the completion mask (times TRL's tool mask).
        loss_type: TRL's loss_type.
        max_completion_length: dr_grpo's constant.
        normalizer: cispo / dapo / vespo: TRL's token count of one accumulation window on this process
            (num_items_in_batch / processes x accumulation / steps_per_generation in train).

    Returns:
        0-d loss.

    Raises:
        ValueError: an unknown loss type, or no normalizer where one is needed.
    """
    m = mask.to(per_token.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * max_completion_length)
    if loss_type in ("cispo", "dapo", "vespo"):
        if normalizer is None:
            raise ValueError(f"loss_type={loss_type!r} aggregates over TRL's token count: pass normalizer")
        return (per_token * m).sum() / normalizer
    if loss_type == "luspo":
        return (per_token * m).sum(-1).mean()
    raise ValueError(f"unknown loss_type={loss_type!r}; TRL 1.16 has {LOSS_TYPES}")
