"""Policy losses of the trainer: one table, `LOSSES`, of Lp-Reg and the entropy-control baselines.

Every loss returns its micro-batch's share of the mini-batch loss, NUMERATOR / DENOMINATOR, where
the denominator is the whole mini-batch's (all micro-batches, all ranks; `loss_denominator`), so
the aggregation is exact under gradient accumulation and data parallelism:

    token-mean            sum_t loss_t            / counted tokens of the mini-batch
    seq-mean-token-mean   sum_i mean_t loss_it    / sequences of the mini-batch
    seq-mean-token-sum    sum_i sum_t loss_it     / sequences of the mini-batch

Counted tokens are the valid tokens; for 80_20 they are its selected tokens (the authors' code
masks the loss to them, so the mean is over them). Without a denominator a loss returns its
numerator.

Baselines, with their published defaults (r = exp(logp - old_logp), A the advantage):

- grpo: PPO-clip surrogate max(-A r, -A clip(r, 1 - 0.2, 1 + 0.2)).
- clip_higher (DAPO): the same with epsilon_high = 0.28. Off-policy by default (see config).
- entropy_bonus: grpo - coef * H(p) per token (coef 0.002, the paper's §5.1.2 baseline).
- 80_20 ("Beyond the 80/20 rule", built on DAPO's clip-higher): only the k = ceil(0.2 n)
  tokens with the highest entropy among the step's n valid tokens get a policy gradient, and
  the token-mean is over those k tokens.
- kl_cov ("The Entropy Mechanism of RL for reasoning LMs"): unclipped -A r, plus
  coef * |logp - old_logp| on the top k = max(1, int(0.002 n)) tokens by centred covariance
  (A - mean A)(logp - mean logp) over the step's n valid tokens (coef 1). Off-policy by default.
- clip_cov (same paper): the PPO-clip surrogate, with the loss (and so the gradient) of
  max(1, int(0.0002 n)) tokens zeroed, drawn at random among the tokens whose covariance lies
  in (1, 5) and which the ratio clip did not already clip.

Step-wide choices (entropy percentile, covariance top-k, random Clip-Cov draw, and Lp-Reg's paper-form
rho-percentile, `lpreg.selection_threshold`) are made once per step by `Loss.choose` on the per-token
statistics of all ranks, gathered in a fixed order, so they do not depend on micro-batching or
sharding. The released form selects within each call (micro-batch), as the released code does
(docs/spec.md §3), so it needs no step-wide pass (`lpreg.needs_step_selection`).

Adding a loss is one function and one entry (docs/architecture.md): a baseline on the PPO surrogate
writes its per-token loss from the shared pieces (`PPOTerms`), e.g.

    def _terms_my_bonus(t: PPOTerms, cfg) -> Tensor:
        return t.pg - 0.01 * t.entropy                              # (B, T) per-token loss

    LOSSES["my_bonus"] = Loss("my bonus", terms=_terms_my_bonus)   # or a line in the table below

It is then a `--loss` choice, is validated, trained and logged like the others, and a
`python -m lpreg.experiments.compare --arms my_bonus` arm.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from lpreg import lpreg_policy_loss, lpreg_token_stats, mechanism_metrics, needs_step_selection, selection_threshold

__all__ = ["Arm", "Loss", "LOSSES", "PPOTerms", "StepTokens", "top_entropy_count", "select_tokens",
           "scatter_selection", "counted_tokens", "aggregate", "loss_denominator", "method_loss",
           "summarise_loss_metrics"]


class Arm(NamedTuple):
    """A named setting of a loss for `python -m lpreg.experiments.compare`: its extra lpreg-train flags."""

    name: str
    label: str
    flags: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PPOTerms:
    """The per-token pieces a baseline is built from, each (B, T)."""

    logp: Tensor  # log p_y, differentiable
    old_logp: Tensor  # the rollout policy's (this pass's, detached, on-policy)
    entropy: Tensor  # H(p), differentiable
    adv: Tensor
    unclipped: Tensor  # -A r
    clipped: Tensor  # -A clip(r, 1 - clip_low, 1 + clip_high)
    pg: Tensor  # max(unclipped, clipped): the PPO-clip surrogate
    selected: Tensor  # float: the loss's step-wide token choice (zeros when it has none)


@dataclass
class StepTokens:
    """A step's per-token statistics on this rank, per micro-batch, for a step-wide choice."""

    old_logp: List[Tensor]  # (B_j, T) per micro-batch j
    entropy: List[Tensor]
    adv: List[Tensor]
    masks: List[Tensor]
    gather: Callable[[Tensor], Tensor]  # this rank's (n,) values -> every rank's, in rank order
    offset: int  # where this rank's tokens start in the gathered order
    generator: torch.Generator  # seeds a random choice (clip_cov)

    def flat(self, tensors: List[Tensor]) -> Tensor:
        """Every rank's valid-token values, in the fixed global order."""
        return self.gather(torch.cat([t[m > 0] for t, m in zip(tensors, self.masks)])).cpu()


@dataclass(frozen=True)
class Loss:
    """One loss of the trainer: everything the config, the update, the step-wide choice and compare read."""

    label: str  # its name in figures and tables
    # the per-token loss from the shared PPO pieces (a baseline); None when `micro` computes the loss
    terms: Optional[Callable[[PPOTerms, Any], Tensor]] = None
    # a token choice that depends on the whole step: (logp, entropy, adv) over the step's n valid
    # tokens, cfg, generator -> (n,) bool
    select: Optional[Callable[..., Tensor]] = None
    off_policy: bool = False  # published with 8 updates per rollout: on-policy it would equal grpo
    clip_high: str = "clip_high"  # the TrainConfig field of its upper ratio clip
    mean_over_selected: bool = False  # the token-mean runs over its selected tokens only (80_20)
    arms: Tuple[Arm, ...] = ()  # its settings in compare's sweeps
    # a loss that is not the PPO surrogate plus terms: the whole micro-batch loss (Lp-Reg), with the
    # signature of `_ppo_loss` after its first argument
    micro: Optional[Callable[..., Tuple[Tensor, Dict[str, Tensor]]]] = None
    # a step-wide choice other than a token choice: (StepTokens, cfg) -> one choice per micro-batch
    step_select: Optional[Callable[[StepTokens, Any], list]] = None
    # whether cfg needs the step-wide choice; None: whenever `select` is set
    needs_selection: Optional[Callable[[Any], bool]] = None

    def selects(self, cfg) -> bool:
        """Whether this loss, as `cfg` sets it, needs a choice made over the whole step first."""
        return self.needs_selection(cfg) if self.needs_selection is not None else self.select is not None

    def choose(self, tokens: StepTokens, cfg) -> list:
        """The step-wide choice, one entry per micro-batch: (B_j, T) bool, or Lp-Reg's threshold."""
        if self.step_select is not None:
            return self.step_select(tokens, cfg)
        if self.select is None:
            raise ValueError(f"loss {self.label!r} needs a step-wide choice but has neither select nor step_select")
        sel = self.select(tokens.flat(tokens.old_logp), tokens.flat(tokens.entropy), tokens.flat(tokens.adv), cfg,
                          tokens.generator)
        n_local = sum(int((m > 0).sum()) for m in tokens.masks)
        return scatter_selection(sel[tokens.offset:tokens.offset + n_local], tokens.masks)


# --- step-wide token choices (over the step's n valid tokens, in a fixed global order) --------------

def top_entropy_count(n: int, frac: float) -> int:
    """80_20's k = ceil(frac n), at least 1 and at most n, computed exactly (0.2 * 15 is
    3.0000000000000004 in floating point, whose ceil would be 4)."""
    exact = Fraction(frac).limit_denominator(10**6)
    return min(int(n), max(1, math.ceil(int(n) * exact)))


def _top(values: Tensor, k: int) -> Tensor:
    out = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    out[torch.topk(values, k, largest=True, sorted=False).indices] = True
    return out


def _covariance(logp: Tensor, adv: Tensor) -> Tensor:
    a, lp = adv.double(), logp.double()
    return (a - a.mean()) * (lp - lp.mean())  # centred covariance of each token


def _top_entropy(logp, entropy, adv, cfg, generator) -> Tensor:
    return _top(entropy.double(), top_entropy_count(logp.numel(), cfg.top_entropy_frac))


def _top_covariance(logp, entropy, adv, cfg, generator) -> Tensor:
    return _top(_covariance(logp, adv), max(1, int(logp.numel() * cfg.kl_cov_ratio)))


def _covariance_band_draw(logp, entropy, adv, cfg, generator) -> Tensor:
    # On-policy the ratio is 1 at selection time, so the ratio clip has clipped nothing yet and the
    # "not already clipped" condition of the reference holds for all.
    cov = _covariance(logp, adv)
    band = torch.nonzero((cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub), as_tuple=True)[0]
    k = min(max(1, int(logp.numel() * cfg.clip_cov_ratio)), band.numel())
    out = torch.zeros(logp.numel(), dtype=torch.bool, device=logp.device)
    out[band[torch.randperm(band.numel(), generator=generator)[:k].to(band.device)]] = True
    return out


def _lpreg_thresholds(tokens: StepTokens, cfg) -> list:
    # the paper form's step-wide rho-percentile, chosen on the old log-probs: exactly the values
    # its threshold compares against
    return selection_threshold(tokens.old_logp, tokens.masks, rho=cfg.lpreg_rho)


# --- per-token losses of the baselines --------------------------------------------------------------

def _terms_grpo(t: PPOTerms, cfg) -> Tensor:
    return t.pg


def _terms_entropy_bonus(t: PPOTerms, cfg) -> Tensor:
    return t.pg - cfg.entropy_coef * t.entropy


def _terms_80_20(t: PPOTerms, cfg) -> Tensor:
    return t.pg * t.selected


def _terms_kl_cov(t: PPOTerms, cfg) -> Tensor:
    return t.unclipped + cfg.kl_cov_coef * (t.logp - t.old_logp).abs() * t.selected


def _terms_clip_cov(t: PPOTerms, cfg) -> Tensor:
    return t.pg * (1.0 - t.selected)


# --- the micro-batch losses ---------------------------------------------------------------------------

def _ppo_loss(spec: Loss, logits, labels, adv, old_logp, mask, cfg, choice, proxy, denominator):
    """A baseline: the PPO pieces from the package's token statistics, then `spec.terms`."""
    stats = lpreg_token_stats(logits, labels, temperature=cfg.temperature, mode=cfg.lpreg_mode,
                              threshold=cfg.lpreg_threshold, backend=cfg.token_stats_backend)
    logp, entropy = stats.logp, stats.entropy
    old_logp = logp.detach() if old_logp is None else old_logp
    selected = choice
    if selected is None and spec.select is not None:  # one micro-batch holds the whole step: choose here
        valid = mask > 0
        flat = spec.select(logp.detach()[valid], entropy.detach()[valid], adv[valid], cfg, None)
        selected = scatter_selection(flat, [mask])[0]
    sel = selected.float() if selected is not None else torch.zeros_like(mask)
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + getattr(cfg, spec.clip_high))
    t = PPOTerms(logp=logp, old_logp=old_logp, entropy=entropy, adv=adv, unclipped=unclipped, clipped=clipped,
                 pg=torch.maximum(unclipped, clipped), selected=sel)
    assert spec.terms is not None, f"loss {spec.label!r}: a baseline (no `micro`) needs `terms`"
    numerator = aggregate(spec.terms(t, cfg) * mask, counted_tokens(spec, mask, selected), cfg.loss_agg_mode)
    loss = numerator if denominator is None else numerator / denominator
    with torch.no_grad():
        sums = {
            "actor/pg_loss": loss.detach(),
            "actor/entropy": (entropy * mask).sum(),
            "actor/ppo_kl": ((old_logp - logp) * mask).sum(),
            "actor/pg_clipfrac": ((clipped > unclipped).float() * mask).sum(),
            "actor/selected_frac": (sel * mask).sum(),
            "lpreg_kl_sum": torch.zeros(()),  # Lp-Reg's penalty is not part of a baseline
            "lpreg_n_sel": torch.zeros(()),
        }
    return loss, sums


# The package's loss options (lpreg.LossConfig fields) and the TrainConfig fields that set them: one list,
# checked when the config is built (TrainConfig.lpreg_loss_config) and used by every Lp-Reg update.
LPREG_OPTIONS = {"compat": "lpreg_compat", "temperature": "temperature", "mode": "lpreg_mode",
                 "threshold": "lpreg_threshold", "rho": "lpreg_rho", "beta": "lpreg_beta",
                 "clip_low": "lpreg_clip_low", "clip_high": "lpreg_clip_high", "loss_agg_mode": "loss_agg_mode",
                 "backend": "token_stats_backend"}


def lpreg_options(cfg) -> Dict[str, Any]:
    """{LossConfig field: its value in `cfg`} for the fields of LPREG_OPTIONS."""
    return {option: getattr(cfg, name) for option, name in LPREG_OPTIONS.items()}


def _lpreg_loss(spec: Loss, logits, labels, adv, old_logp, mask, cfg, choice, proxy, denominator):
    """Lp-Reg through the package's `lpreg_policy_loss`. token-mean with a denominator (the update):
    the mini-batch's token count is the package's `num_tokens`, so its loss already is this
    micro-batch's share. The seq-mean modes have no such count in the package: its mean over this
    call's sequences is rescaled by sequences here / sequences of the mini-batch. Without a
    denominator: the numerator, the package's mean over this call times its count."""
    n_local = ((mask > 0) & (labels != -100)).sum().float()
    exact = cfg.loss_agg_mode == "token-mean" and denominator is not None
    loss, m = lpreg_policy_loss(
        logits, labels, adv, old_logp, mask, proxy=proxy, selection_threshold=choice, return_tensors=True,
        num_tokens=int(round(denominator)) if exact else None, **lpreg_options(cfg),
    )
    if not exact:
        count = n_local if cfg.loss_agg_mode == "token-mean" else float(mask.shape[0])
        loss = loss * count if denominator is None else loss * (count / denominator)
    # the package's metrics are means over this call's valid tokens: back to sums
    n_sel = m["actor/lpreg_frac"].detach() * n_local
    sums = {
        "actor/pg_loss": loss.detach(),  # the whole loss (surrogate + beta * penalty)
        "actor/entropy": m["actor/entropy"].detach() * n_local,
        "actor/ppo_kl": m["actor/ppo_kl"].detach() * n_local,
        "actor/pg_clipfrac": m["actor/pg_clipfrac"].detach() * n_local,
        "actor/selected_frac": n_sel,
        "lpreg_kl_sum": m["actor/lpreg_kl"].detach() * n_sel,
        "lpreg_n_sel": n_sel,
        **mechanism_sums_of(m),
    }
    return loss, sums


def mechanism_sums_of(m: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The package's mechanism metrics of one call (counts, and means over its candidates or its
    selected tokens) back to sums, under "lpreg_mech/<key of lpreg.mechanism_sums>": additive over
    micro-batches and ranks, pooled into exact ratios by `summarise_loss_metrics`."""
    cand, sel = m["actor/lpreg_candidates"].detach(), m["actor/lpreg_selected"].detach()
    return {"lpreg_mech/candidates": cand, "lpreg_mech/filtered": m["actor/lpreg_filtered_frac"].detach() * cand,
            "lpreg_mech/selected": sel, "lpreg_mech/kept_mass": m["actor/lpreg_kept_mass"].detach() * sel,
            "lpreg_mech/push": m["actor/lpreg_push"].detach() * sel,
            "lpreg_mech/p_y": m["actor/lpreg_p_y"].detach() * sel}


# --- the table ----------------------------------------------------------------------------------------

LOSSES: Dict[str, Loss] = {
    "lpreg": Loss("Lp-Reg", micro=_lpreg_loss, step_select=_lpreg_thresholds,
                  needs_selection=lambda cfg: needs_step_selection(cfg.lpreg_compat),
                  arms=(Arm("lpreg_released", "Lp-Reg (released)", ("--lpreg-compat", "released")),
                        Arm("lpreg_paper", "Lp-Reg (paper)", ("--lpreg-compat", "paper")))),
    "grpo": Loss("GRPO", terms=_terms_grpo, arms=(Arm("grpo", "GRPO"),)),
    "clip_higher": Loss("clip-higher", terms=_terms_grpo, off_policy=True, clip_high="clip_high_dapo",
                        # 0: the published 8 updates per rollout
                        arms=(Arm("clip_higher", "clip-higher (off-policy)", ("--mini-batches", "0")),)),
    "entropy_bonus": Loss("entropy bonus", terms=_terms_entropy_bonus,
                          arms=(Arm("entropy_bonus", "entropy bonus 0.002", ("--entropy-coef", "0.002")),)),
    "80_20": Loss("80/20", terms=_terms_80_20, select=_top_entropy, clip_high="clip_high_dapo",
                  mean_over_selected=True, arms=(Arm("80_20", "80/20"),)),
    "kl_cov": Loss("KL-Cov", terms=_terms_kl_cov, select=_top_covariance, off_policy=True),
    "clip_cov": Loss("Clip-Cov", terms=_terms_clip_cov, select=_covariance_band_draw),
}


def _loss(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name]


@torch.no_grad()
def select_tokens(name: str, logp: Tensor, entropy: Tensor, adv: Tensor, cfg,
                  *, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Step-wide token choice of a baseline. logp, entropy, adv: (n,) over the step's n valid
    tokens, in a fixed global order. Returns (n,) bool, or None when `name` makes no token choice.

    80_20: the top `top_entropy_count(n, frac)` = ceil(frac n) entropies; kl_cov: the top max(1, int(ratio n))
    covariances; clip_cov: a random draw of max(1, int(ratio n)) tokens from the covariance band
    (fewer if the band is smaller), with `generator` seeding the draw.
    """
    spec = _loss(name)
    if spec.select is None or logp.numel() == 0:
        return None
    return spec.select(logp, entropy, adv, cfg, generator)


def scatter_selection(flat_sel: Tensor, masks: List[Tensor]) -> List[Tensor]:
    """(n,) bool over valid tokens in order -> list of (B, T) bool, one per mask in `masks`."""
    total = sum(int((m > 0).sum()) for m in masks)
    if flat_sel.numel() != total:
        raise ValueError(f"flat_sel must hold one entry per valid token ({total}), got {flat_sel.numel()}")
    out, start = [], 0
    for m in masks:
        valid = m > 0
        cnt = int(valid.sum())
        sel = torch.zeros_like(valid)
        sel[valid] = flat_sel[start : start + cnt].to(sel.device)
        out.append(sel)
        start += cnt
    return out


def counted_tokens(spec: Loss, mask: Tensor, selected: Optional[Tensor]) -> Tensor:
    """(B, T) float: the tokens a loss's mean runs over (80_20: its selected ones)."""
    if spec.mean_over_selected and selected is not None:
        return mask * selected.float()
    return mask


def aggregate(per_token: Tensor, counted: Tensor, mode: str) -> Tensor:
    """The numerator of `mode` over one micro-batch (module docstring). per_token: (B, T),
    zero off the valid tokens; counted: (B, T) float, the tokens each sequence's mean is over."""
    if mode == "token-mean":
        return (per_token * counted).sum()
    if mode == "seq-mean-token-mean":
        return ((per_token * counted).sum(-1) / counted.sum(-1).clamp(min=1)).sum()
    if mode == "seq-mean-token-sum":
        return (per_token * counted).sum()
    raise ValueError(f"loss_agg_mode must be token-mean, seq-mean-token-mean or seq-mean-token-sum, got {mode!r}")


def loss_denominator(cfg, masks: List[Tensor], chosen: List[Optional[Tensor]], n_step_tokens: int) -> float:
    """This rank's part of one mini-batch's denominator (the loop sums it over ranks).

    masks / chosen: the mini-batch's micro-batches. token-mean counts the valid tokens, or
    80_20's selected tokens: `chosen` when the step-wide choice was made up front, else (one
    micro-batch holding the whole step on one rank) exactly top_entropy_count(n_step_tokens).
    The seq-mean modes count sequences."""
    if cfg.loss_agg_mode != "token-mean":
        return float(sum(m.shape[0] for m in masks))
    if _loss(cfg.loss).mean_over_selected:
        if all(c is not None for c in chosen):
            return float(sum(int((m * c.float()).sum()) for m, c in zip(masks, chosen) if c is not None))
        return float(top_entropy_count(n_step_tokens, cfg.top_entropy_frac))
    return float(sum(int((m > 0).sum()) for m in masks))


def method_loss(name: str, logits: Tensor, labels: Tensor, adv: Tensor, old_logp: Optional[Tensor],
                mask: Tensor, cfg, *, selected: Optional[Tensor] = None, lpreg_threshold=None,
                proxy=None, denominator: Optional[float] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One micro-batch of the loss `name` (`LOSSES`). logits (B, T, V); labels (B, T) with -100 off
    the response; adv (B, T) per token; old_logp (B, T) or None (on-policy: the logp of this very
    pass, detached); mask (B, T) float. `selected` (B, T) bool from `select_tokens` via
    `scatter_selection`, or None to choose within this micro-batch (exact when it holds the
    whole step); `lpreg_threshold`: a `lpreg.SelectionThreshold` for Lp-Reg's paper form, or
    None (same rule); `proxy`: Lp-Reg's q, None (on-policy: the current logits, detached) or a
    `lpreg.SparseProxy` of the rollout policy (off-policy). `denominator`: the mini-batch's
    (`loss_denominator` summed over ranks), or None for the numerator.

    Returns (loss, metric_sums): the `cfg.loss_agg_mode` numerator over `denominator` (module
    docstring), and sums of the metrics over valid tokens (see `summarise_loss_metrics`), of which
    actor/pg_loss is the returned loss.
    """
    spec = _loss(name)
    choice = selected if selected is not None else lpreg_threshold
    if spec.micro is not None:
        return spec.micro(spec, logits, labels, adv, old_logp, mask, cfg, choice, proxy, denominator)
    return _ppo_loss(spec, logits, labels, adv, old_logp, mask, cfg, choice, proxy, denominator)


def summarise_loss_metrics(sums: Dict[str, float], n_tokens: int) -> Dict[str, float]:
    """Step-wide metric sums (all micro-batches, all ranks) -> means under verl's names.

    actor/lpreg_frac = selected / valid tokens; actor/lpreg_kl = mean penalty over the selected
    tokens (0 when none), as the package reports them; for Lp-Reg, the mechanism's metrics
    (actor/lpreg_candidates, _filtered_frac, _selected, _kept_mass, _push, _p_y) as exact ratios of
    the step's pooled sums."""
    n = max(float(n_tokens), 1.0)
    out = {k: float(v) / n for k, v in sums.items() if k.startswith("actor/")}
    out["actor/lpreg_frac"] = float(sums["lpreg_n_sel"]) / n
    out["actor/lpreg_kl"] = float(sums["lpreg_kl_sum"]) / max(float(sums["lpreg_n_sel"]), 1.0)
    mech = {k.split("/", 1)[1]: torch.as_tensor(float(v)) for k, v in sums.items() if k.startswith("lpreg_mech/")}
    if mech:  # Lp-Reg's mechanism, pooled over the step: what it acted on (docs/diagnose.md)
        out.update({f"actor/{k}": float(v) for k, v in mechanism_metrics(mech).items()})
    return out
