"""Policy losses of the trainer: Lp-Reg (from the package) and the entropy-control baselines.

Every loss here returns a NUMERATOR over the micro-batch (see `loss_agg_mode`) plus
token-weighted metric sums; the loop divides it by the DENOMINATOR of the whole mini-batch
(all micro-batches, all ranks; `loss_denominator`), which makes the aggregation exact under
gradient accumulation and data parallelism:

    token-mean            sum_t loss_t            / counted tokens of the mini-batch
    seq-mean-token-mean   sum_i mean_t loss_it    / sequences of the mini-batch
    seq-mean-token-sum    sum_i sum_t loss_it     / sequences of the mini-batch

Counted tokens are the valid tokens; for 80_20 they are its selected tokens (the authors'
code masks the loss to them, so the mean is over them).

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

The batch-wide choices (entropy percentile, covariance top-k, random Clip-Cov draw) are made
once per step by `select_tokens` on the per-token statistics of all ranks, gathered in a fixed
order, so they do not depend on micro-batching or sharding; Lp-Reg's lowest-rho percentile
(paper form) is made the same way by the package's `lpreg.selection.selection_threshold`.
The released form selects within each call (micro-batch), as the released code does
(docs/spec.md §3).
"""

import math
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from lpreg.policy_loss import lpreg_policy_loss
from lpreg.token_stats import lpreg_token_stats

__all__ = ["NEEDS_SELECTION", "top_entropy_count", "select_tokens", "scatter_selection", "counted_tokens",
           "aggregate", "loss_denominator", "method_loss", "summarise_loss_metrics"]

# baselines whose per-token choice depends on statistics of the whole step (Lp-Reg's own
# batch-wide choice is `lpreg.selection_threshold`, used by the loop)
NEEDS_SELECTION = ("80_20", "kl_cov", "clip_cov")


def top_entropy_count(n: int, frac: float) -> int:
    """80_20's k = ceil(frac n), at least 1 and at most n, computed exactly (0.2 * 15 is
    3.0000000000000004 in floating point, whose ceil would be 4)."""
    exact = Fraction(frac).limit_denominator(10**6)
    return min(int(n), max(1, math.ceil(int(n) * exact)))


@torch.no_grad()
def select_tokens(name: str, logp: Tensor, entropy: Tensor, adv: Tensor, cfg,
                  *, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Batch-wide token choice of a baseline. logp, entropy, adv: (n,) over the step's n valid
    tokens, in a fixed global order. Returns (n,) bool, or None when `name` selects nothing.

    80_20: the top `top_entropy_count(n, frac)` = ceil(frac n) entropies; kl_cov: the top max(1, int(ratio n))
    covariances; clip_cov: a random draw of max(1, int(ratio n)) tokens from the covariance band
    (fewer if the band is smaller), with `generator` seeding the draw.
    """
    n = logp.numel()
    if name not in NEEDS_SELECTION or n == 0:
        return None
    out = torch.zeros(n, dtype=torch.bool, device=logp.device)
    if name == "80_20":
        k = top_entropy_count(n, cfg.top_entropy_frac)
        out[torch.topk(entropy.double(), k, largest=True, sorted=False).indices] = True
        return out
    a, lp = adv.double(), logp.double()
    cov = (a - a.mean()) * (lp - lp.mean())
    if name == "kl_cov":
        k = max(1, int(n * cfg.kl_cov_ratio))
        out[torch.topk(cov, k, largest=True, sorted=False).indices] = True
        return out
    # clip_cov. On-policy the ratio is 1 at selection time, so the ratio clip has clipped
    # nothing yet and the "not already clipped" condition of the reference holds for all.
    band = torch.nonzero((cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub), as_tuple=True)[0]
    k = min(max(1, int(n * cfg.clip_cov_ratio)), band.numel())
    perm = torch.randperm(band.numel(), generator=generator)[:k].to(band.device)
    out[band[perm]] = True
    return out


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


def counted_tokens(name: str, mask: Tensor, selected: Optional[Tensor]) -> Tensor:
    """(B, T) float: the tokens a loss's mean runs over (80_20: its selected ones)."""
    if name == "80_20" and selected is not None:
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
    if cfg.loss == "80_20":
        if all(c is not None for c in chosen):
            return float(sum(int((m * c.float()).sum()) for m, c in zip(masks, chosen)))
        return float(top_entropy_count(n_step_tokens, cfg.top_entropy_frac))
    return float(sum(int((m > 0).sum()) for m in masks))


def method_loss(name: str, logits: Tensor, labels: Tensor, adv: Tensor, old_logp: Optional[Tensor],
                mask: Tensor, cfg, *, selected: Optional[Tensor] = None, lpreg_threshold=None,
                proxy=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One micro-batch of the loss `name`. logits (B, T, V); labels (B, T) with -100 off the
    response; adv (B, T) per token; old_logp (B, T) or None (on-policy: the logp of this very
    pass, detached); mask (B, T) float. `selected` (B, T) bool from `select_tokens` via
    `scatter_selection`, or None to choose within this micro-batch (exact when it holds the
    whole step); `lpreg_threshold`: a `lpreg.SelectionThreshold` for Lp-Reg's paper form, or
    None (same rule); `proxy`: Lp-Reg's q, None (on-policy: the current logits, detached) or a
    `lpreg.SparseProxy` of the rollout policy (off-policy).

    Returns (numerator, metric_sums): the `cfg.loss_agg_mode` numerator (module docstring),
    and sums of the metrics over valid tokens (see `summarise_loss_metrics`).
    """
    if name == "lpreg":
        return _lpreg_loss(logits, labels, adv, old_logp, mask, cfg, lpreg_threshold, proxy)
    if name not in ("grpo", "clip_higher", "entropy_bonus") + NEEDS_SELECTION:
        raise ValueError(f"loss must be one of lpreg, grpo, clip_higher, entropy_bonus, 80_20, kl_cov, clip_cov; "
                         f"got {name!r}")
    stats = lpreg_token_stats(
        logits, labels, temperature=cfg.temperature, mode=cfg.lpreg_mode, threshold=cfg.lpreg_threshold,
        backend=cfg.token_stats_backend,
    )
    logp, entropy = stats.logp, stats.entropy
    if old_logp is None:
        old_logp = logp.detach()
    valid = mask > 0
    if selected is None and name in NEEDS_SELECTION:
        flat = select_tokens(name, logp.detach()[valid], entropy.detach()[valid], adv[valid], cfg)
        selected = scatter_selection(flat, [mask])[0]
    per_token, pg, clipped, unclipped = _baseline_terms(name, logp, entropy, old_logp, adv, selected, cfg)
    sel = selected.float() if selected is not None else torch.zeros_like(mask)
    numerator = aggregate(per_token * mask, counted_tokens(name, mask, selected), cfg.loss_agg_mode)
    with torch.no_grad():
        sums = {
            "actor/pg_loss": numerator.detach(),
            "actor/entropy": (entropy * mask).sum(),
            "actor/ppo_kl": ((old_logp - logp) * mask).sum(),
            "actor/pg_clipfrac": ((clipped > unclipped).float() * mask).sum(),
            "actor/selected_frac": (sel * mask).sum(),
            "lpreg_kl_sum": torch.zeros(()),  # Lp-Reg's penalty is not part of a baseline
            "lpreg_n_sel": torch.zeros(()),
        }
    return numerator, sums


def _baseline_terms(name, logp, entropy, old_logp, adv, selected, cfg):
    """Per-token loss of a baseline, plus its PPO pieces (pg, clipped, unclipped) for metrics."""
    sel = selected.float() if selected is not None else torch.zeros_like(logp)
    clip_high = cfg.clip_high_dapo if name in ("clip_higher", "80_20") else cfg.clip_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    extra = torch.zeros_like(pg)
    if name == "entropy_bonus":
        extra = -cfg.entropy_coef * entropy
    elif name == "80_20":
        pg = pg * sel
    elif name == "kl_cov":
        pg = unclipped
        extra = cfg.kl_cov_coef * (logp - old_logp).abs() * sel
    elif name == "clip_cov":
        pg = pg * (1.0 - sel)
    return pg + extra, pg, clipped, unclipped


def _lpreg_loss(logits, labels, adv, old_logp, mask, cfg, threshold, proxy):
    """Lp-Reg through the package's `lpreg_policy_loss`: its value over this micro-batch, whose
    weights are 1 / (valid tokens) (token-mean) or 1 / sequences (seq-mean modes), is turned
    back into the numerator by multiplying by that count."""
    # old_logp None: on-policy, the package uses this pass's own detached logp (ratio exactly 1)
    n_local = ((mask > 0) & (labels != -100)).sum().float()
    scale = n_local if cfg.loss_agg_mode == "token-mean" else float(mask.shape[0])
    loss, m = lpreg_policy_loss(
        logits, labels, adv, old_logp, mask, compat=cfg.lpreg_compat, temperature=cfg.temperature,
        mode=cfg.lpreg_mode, threshold=cfg.lpreg_threshold, rho=cfg.lpreg_rho, beta=cfg.lpreg_beta,
        clip_low=cfg.lpreg_clip_low, clip_high=cfg.lpreg_clip_high, loss_agg_mode=cfg.loss_agg_mode,
        proxy=proxy, selection_threshold=threshold, backend=cfg.token_stats_backend, return_tensors=True,
    )
    n_sel = m["actor/lpreg_frac"].detach() * n_local
    sums = {
        # the package's pg_loss is the whole loss (surrogate + beta * penalty)
        "actor/pg_loss": loss.detach() * scale,
        "actor/entropy": m["actor/entropy"].detach() * n_local,
        "actor/ppo_kl": m["actor/ppo_kl"].detach() * n_local,
        "actor/pg_clipfrac": m["actor/pg_clipfrac"].detach() * n_local,
        "actor/selected_frac": n_sel,
        "lpreg_kl_sum": m["actor/lpreg_kl"].detach() * n_sel,
        "lpreg_n_sel": n_sel,
    }
    return loss * scale, sums


def summarise_loss_metrics(sums: Dict[str, float], n_tokens: int) -> Dict[str, float]:
    """Step-wide metric sums (all micro-batches, all ranks) -> means under verl's names.

    actor/lpreg_frac = selected / valid tokens; actor/lpreg_kl = mean penalty over the selected
    tokens (0 when none), as the package reports them."""
    n = max(float(n_tokens), 1.0)
    out = {k: float(v) / n for k, v in sums.items() if k.startswith("actor/")}
    out["actor/lpreg_frac"] = float(sums["lpreg_n_sel"]) / n
    out["actor/lpreg_kl"] = float(sums["lpreg_kl_sum"]) / max(float(sums["lpreg_n_sel"]), 1.0)
    return out
