"""Policy losses of the trainer: Lp-Reg (from the package) and the entropy-control baselines.

Every loss here returns the SUM of its per-token losses over the micro-batch's valid tokens,
plus token-weighted metric sums; the loop divides by the number of valid tokens of the whole
step (all micro-batches, all ranks), which makes "token-mean" exact under gradient
accumulation and data parallelism.

Baselines, with their published defaults (r = exp(logp - old_logp), A the advantage):

- grpo: PPO-clip surrogate max(-A r, -A clip(r, 1 - 0.2, 1 + 0.2)).
- clip_higher (DAPO): the same with epsilon_high = 0.28.
- entropy_bonus: grpo - coef * H(p) per token (coef 0.001, verl's `entropy_coeff`).
- 80_20 ("Beyond the 80/20 rule", built on DAPO's clip-higher): only tokens whose entropy is
  in the top 20% of the step's valid tokens get a policy gradient; the others contribute 0
  (they still count in the token-mean denominator).
- kl_cov ("The Entropy Mechanism of RL for reasoning LMs"): unclipped -A r, plus
  coef * |logp - old_logp| on the top k = max(1, int(0.002 n)) tokens by centred covariance
  (A - mean A)(logp - mean logp) over the step's n valid tokens (coef 1).
- clip_cov (same paper): the PPO-clip surrogate, with the loss (and so the gradient) of
  max(1, int(0.0002 n)) tokens zeroed, drawn at random among the tokens whose covariance lies
  in (1, 5) and which the ratio clip did not already clip.

The batch-wide choices (entropy percentile, covariance top-k, random Clip-Cov draw) are made
once per step by `select_tokens` on the per-token statistics of all ranks, gathered in a fixed
order, so they do not depend on micro-batching or sharding; Lp-Reg's lowest-rho percentile is
made the same way by the package's `lpreg.selection.selection_threshold`.
"""

import torch

from lpreg.policy_loss import lpreg_policy_loss
from lpreg.token_stats import lpreg_token_stats

__all__ = ["NEEDS_SELECTION", "select_tokens", "scatter_selection", "policy_loss", "finish_metrics"]

# baselines whose per-token choice depends on statistics of the whole step (Lp-Reg's own
# batch-wide choice is `lpreg.selection_threshold`, used by the loop)
NEEDS_SELECTION = ("80_20", "kl_cov", "clip_cov")


@torch.no_grad()
def select_tokens(name, logp, entropy, adv, cfg, *, generator=None):
    """Batch-wide token choice of a baseline. logp, entropy, adv: (n,) over the step's n valid
    tokens, in a fixed global order. Returns (n,) bool, or None when `name` selects nothing.

    80_20: the top max(1, int(frac n)) entropies; kl_cov: the top max(1, int(ratio n))
    covariances; clip_cov: a random draw of max(1, int(ratio n)) tokens from the covariance band
    (fewer if the band is smaller), with `generator` seeding the draw.
    """
    n = logp.numel()
    if name not in NEEDS_SELECTION or n == 0:
        return None
    out = torch.zeros(n, dtype=torch.bool, device=logp.device)
    if name == "80_20":
        k = max(1, int(n * cfg.top_entropy_frac))
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


def scatter_selection(flat_sel, masks):
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


def policy_loss(name, logits, labels, adv, old_logp, mask, cfg, *, selected=None, lpreg_threshold=None):
    """One micro-batch. logits (B, T, V); labels (B, T) with -100 off the response; adv (B, T)
    per token; old_logp (B, T) or None (on-policy: the logp of this very pass, detached);
    mask (B, T) float. `selected` (B, T) bool from `select_tokens` via `scatter_selection`,
    or None to choose within this micro-batch (exact when it holds the whole step);
    `lpreg_threshold`: a `lpreg.SelectionThreshold` for Lp-Reg, or None (same rule).

    Returns (loss_sum, metric_sums): the sum of per-token losses over valid tokens, and sums
    of the metrics (token-weighted; see `finish_metrics`).
    """
    if name == "lpreg":
        return _lpreg_loss(logits, labels, adv, old_logp, mask, cfg, lpreg_threshold)
    if name not in ("grpo", "clip_higher", "entropy_bonus") + NEEDS_SELECTION:
        raise ValueError(f"loss must be one of lpreg, grpo, clip_higher, entropy_bonus, 80_20, kl_cov, clip_cov; got {name!r}")
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
    sel = selected.float() if selected is not None else torch.zeros_like(mask)
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
    per_token = (pg + extra) * mask
    with torch.no_grad():
        sums = {
            "actor/pg_loss": (pg * mask).sum(),
            "actor/entropy": (entropy * mask).sum(),
            "actor/ppo_kl": ((old_logp - logp) * mask).sum(),
            "actor/pg_clipfrac": ((clipped > unclipped).float() * mask).sum(),
            "actor/selected_frac": (sel * mask).sum(),
            "lpreg_kl_sum": torch.zeros(()),  # Lp-Reg's penalty is not part of a baseline
            "lpreg_n_sel": torch.zeros(()),
        }
    return per_token.sum(), sums


def _lpreg_loss(logits, labels, adv, old_logp, mask, cfg, threshold):
    """Lp-Reg through the package's `lpreg_policy_loss`: its token-mean over this micro-batch
    is turned back into a sum (times the micro-batch's valid-token count)."""
    if old_logp is None:
        with torch.no_grad():  # on-policy: the ratio is exactly 1, gradient still flows via logp
            old_logp = lpreg_token_stats(
                logits.detach(), labels, temperature=cfg.temperature, backend=cfg.token_stats_backend
            ).logp
    n_local = ((mask > 0) & (labels != -100)).sum().float()
    loss, m = lpreg_policy_loss(
        logits, labels, adv, old_logp, mask, compat=cfg.lpreg_compat, temperature=cfg.temperature,
        mode=cfg.lpreg_mode, threshold=cfg.lpreg_threshold, rho=cfg.lpreg_rho, beta=cfg.lpreg_beta,
        clip_low=cfg.lpreg_clip_low, clip_high=cfg.lpreg_clip_high, loss_agg_mode="token-mean",
        selection_threshold=threshold, backend=cfg.token_stats_backend, return_tensors=True,
    )
    n_sel = m["actor/lpreg_frac"].detach() * n_local
    sums = {
        # the package's pg_loss is the whole loss (surrogate + beta * penalty), token-mean
        "actor/pg_loss": m["actor/pg_loss"].detach() * n_local,
        "actor/entropy": m["actor/entropy"].detach() * n_local,
        "actor/ppo_kl": m["actor/ppo_kl"].detach() * n_local,
        "actor/pg_clipfrac": m["actor/pg_clipfrac"].detach() * n_local,
        "actor/selected_frac": n_sel,
        "lpreg_kl_sum": m["actor/lpreg_kl"].detach() * n_sel,
        "lpreg_n_sel": n_sel,
    }
    return loss * n_local, sums


def finish_metrics(sums, n_tokens):
    """Step-wide metric sums (all micro-batches, all ranks) -> means under verl's names.

    actor/lpreg_frac = selected / valid tokens; actor/lpreg_kl = mean penalty over the selected
    tokens (0 when none), as the package reports them."""
    n = max(float(n_tokens), 1.0)
    out = {k: float(v) / n for k, v in sums.items() if k.startswith("actor/")}
    out["actor/lpreg_frac"] = float(sums["lpreg_n_sel"]) / n
    out["actor/lpreg_kl"] = float(sums["lpreg_kl_sum"]) / max(float(sums["lpreg_n_sel"]), 1.0)
    return out
