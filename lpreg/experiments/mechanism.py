"""Lp-Reg's mechanism, measured directly: what one update does to the tokens it protects.

The paper's claim (arXiv 2510.03222, docs/spec.md §3a): under a negative advantage, GRPO drives
valuable low-probability tokens towards zero; Lp-Reg's penalty keeps them. At a probed step
(`--mechanism-every N`: the first step and every N-th), from the state before that step's update
and on that step's own rollout:

    S            the tokens the released form selects: A < 0, p_y among the k = int(rho n_neg) lowest
                 of the call's negative-advantage tokens (none when k <= 1), and y kept by the proxy
                 filter (logp < proxy_logp); per micro-batch, as the loss selects them
    update_1     one optimizer step of the trainer's update with Lp-Reg at beta = 1 (released form)
    update_0     the same step from the same state at beta = 0: the base loss alone (GRPO with the
                 ratio clip [0, 10]), with no token selected
    r_beta       p_y after update_beta / p_y before, for every token in S (the same tokens for both)

Both updates run on copies of the policy and the optimizer (AdamW state, learning rate, gradient
clip), so the run itself is untouched. Each probe writes one row to `mechanism.jsonl` (step, and per
selected token p_y before, the proxy's kept mass m at its position, r_1 and r_0) and logs
`mechanism/*` means in metrics.jsonl. The claim predicts r_0 < 1 (the tokens are pushed down) and
r_1 > r_0; k3 lifts a selected token's logit by (1/m - 1)(1 - p_y) per unit step (docs/spec.md §3a),
so the gap between r_1 and r_0 grows as m falls below 1. One process (setup checks it), one update
per rollout (the config checks it). Cost per probe: two updates and three forwards of the step's
batch. A sweep's probes are pooled over seeds and drawn by lpreg.experiments.mechanism_report.

`probe` and `summary_lines` are the trainer instrument (`lpreg.trainer.instruments`: before the
update; the end-of-run summary's lines) that `lpreg.experiments` registers under "mechanism".
"""

import copy
import dataclasses
import json
import math
import os
from statistics import median
from types import SimpleNamespace
from typing import Dict, List

import torch
from torch import Tensor

from lpreg import lpreg_token_stats
from lpreg.selection import bottom_k_count, bottom_k_mask
from lpreg.trainer.losses import loss_denominator
from lpreg.trainer.summary import format_number
from lpreg.trainer.update import update

__all__ = ["LOG_FILE", "OPTION", "check_option", "released_selection", "due", "probe", "token_ratios",
           "summarise_probe", "summary_lines"]

LOG_FILE = "mechanism.jsonl"  # one row per probed step, under the run's output_dir
# the trainer option this instrument adds (lpreg.trainer.registry.register_option): at the first step and
# every N steps, from the state before the update, one update with beta = 1 and one with beta = 0 (on
# copies), and p_y after / before for the tokens the released form selects; 0 = never
OPTION = "mechanism_every"
OPTION_HELP = ("probe Lp-Reg's mechanism at the first step and every N steps (mechanism.jsonl; 0 = never; "
               "one process, --mini-batches 1)")


def check_option(cfg) -> None:
    """The option's check (a registered option's `check`): >= 0, and one update per rollout."""
    every = cfg.option(OPTION)
    if every < 0:
        raise ValueError(f"--mechanism-every must be >= 0, got {every!r}")
    if every and cfg.mini_batches > 1:
        raise ValueError(f"--mechanism-every measures one update per rollout: it needs --mini-batches 1, "
                         f"got {cfg.mini_batches}")


def released_selection(logp: Tensor, proxy_logp: Tensor, adv: Tensor, mask: Tensor, rho: float) -> Tensor:
    """(B, T) bool: the tokens the released form selects in one call (docs/spec.md §3): among the
    valid tokens with A < 0, the k = int(rho n_neg) smallest log p_y (ties by position; none when
    k <= 1), of which those whose label the proxy keeps, logp < proxy_logp."""
    neg = ((mask > 0) & (adv < 0)).reshape(-1)
    k = bottom_k_count(neg.sum(), rho)  # the package's own rule and tie order (lpreg.selection)
    bottom, _ = bottom_k_mask(logp.reshape(-1), neg, k)
    return (bottom & (k > 1)).reshape(mask.shape) & (logp < proxy_logp)


def due(cfg, step: int) -> bool:
    """Whether step (0-based) is probed: the first and every `mechanism_every`-th."""
    every = cfg.option(OPTION)
    return bool(every) and (step == 0 or (step + 1) % every == 0)


@torch.no_grad()
def _token_stats(model, plan, cfg) -> List:
    """Per micro-batch, the policy's TokenStats of the step's labels (logp, proxy_logp, ...)."""
    out = []
    for mini in plan.micro:
        for mb in mini:
            b = plan.batch.slice(mb)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[:, :-1]
            out.append(lpreg_token_stats(logits, b.labels, temperature=cfg.temperature, mode=cfg.lpreg_mode,
                                         threshold=cfg.lpreg_threshold, backend=cfg.token_stats_backend))
    return out


def _one_update(run, plan, step: int, beta: float) -> List[Tensor]:
    """The trainer's update of this step, Lp-Reg released at `beta`, on copies of the policy and the
    optimizer; returns log p_y after it, per micro-batch concatenated over the step's rows."""
    cfg = dataclasses.replace(run.cfg, loss="lpreg", lpreg_compat="released", lpreg_beta=float(beta))
    model = copy.deepcopy(run.policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # deep-copied: load_state_dict may keep the very tensors it is given, and AdamW updates them in place
    optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))
    masks = [[plan.batch.loss_mask[mb] for mb in mini] for mini in plan.micro]
    probe_plan = dataclasses.replace(plan, choices=[None] * sum(len(m) for m in masks), proxies=[None] * len(
        plan.proxies), denominators=[loss_denominator(cfg, m, [None] * len(m), plan.n_tokens) for m in masks])
    frozen = SimpleNamespace(step=lambda: None)  # the learning rate of this step, as the real update uses it
    update(SimpleNamespace(cfg=cfg, acc=run.acc, model=model, optimizer=optimizer, scheduler=frozen), probe_plan)
    return [s.logp for s in _token_stats(model, plan, cfg)]


def probe(run, plan, step: int) -> Dict[str, float]:
    """Measure the mechanism at `step` if it is due (module docstring); returns the metrics row's
    `mechanism/*` entries ({} when not due) and appends the step's row to mechanism.jsonl."""
    cfg = run.cfg
    if not due(cfg, step):
        return {}
    if run.acc.num_processes > 1:  # the probe copies one process's whole policy
        raise ValueError(f"--mechanism-every needs one process, got {run.acc.num_processes}")
    before = _token_stats(run.policy, plan, cfg)
    flat = [mb for mini in plan.micro for mb in mini]
    chosen = [released_selection(s.logp, s.proxy_logp, plan.tok_adv[mb], plan.batch.loss_mask[mb], cfg.lpreg_rho)
              for s, mb in zip(before, flat)]
    logp0 = torch.cat([s.logp[c] for s, c in zip(before, chosen)])
    after = {beta: torch.cat([lp[c] for lp, c in zip(_one_update(run, plan, step, beta), chosen)])
             for beta in (1.0, 0.0)}
    # the proxy's kept mass m at each selected token (q_y = p_y / m): k3's push on y is (1/m - 1)(1 - p_y)
    kept = torch.cat([(s.logp - s.proxy_logp)[c] for s, c in zip(before, chosen)]).exp()
    row = {"step": step + 1, "p_before": logp0.exp().tolist(), "kept_mass": kept.tolist(),
           "ratio_beta1": (after[1.0] - logp0).exp().tolist(), "ratio_beta0": (after[0.0] - logp0).exp().tolist()}
    if run.acc.is_main_process:
        with open(os.path.join(cfg.output_dir, LOG_FILE), "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return {f"mechanism/{k}": v for k, v in summarise_probe(row).items()}


def token_ratios(row: dict) -> List[float]:
    """Per selected token of a probe row, (p_y after / before at beta = 1) / (the same at beta = 0):
    how much more of the token's probability the Lp-Reg update keeps than the plain one."""
    return [r1 / r0 for r1, r0 in zip(row["ratio_beta1"], row["ratio_beta0"])]


def summarise_probe(row: dict) -> Dict[str, float]:
    """One probe's numbers: selected tokens, mean p_y before, the mean of log r under each update
    (NaN with none selected), the share of selected tokens whose p_y fell, the median kept mass and
    the median of r_1 / r_0 (`token_ratios`)."""
    n = len(row["p_before"])
    out = {"n_selected": float(n)}
    if not n:
        return {**out, "p_before": math.nan, "log_ratio_beta1": math.nan, "log_ratio_beta0": math.nan,
                "frac_down_beta1": math.nan, "frac_down_beta0": math.nan, "ratio_median": math.nan}
    out["p_before"] = sum(row["p_before"]) / n
    if "kept_mass" in row:
        out["kept_mass"] = sum(row["kept_mass"]) / n
        out["kept_mass_median"] = median(row["kept_mass"])
    for beta in ("beta1", "beta0"):
        ratios = row[f"ratio_{beta}"]
        out[f"log_ratio_{beta}"] = sum(math.log(r) for r in ratios) / n
        out[f"frac_down_{beta}"] = sum(r < 1.0 for r in ratios) / n
    out["ratio_median"] = median(token_ratios(row))
    return out


def summary_lines(rows: List[dict]) -> List[str]:
    """The end-of-run summary's lines: what the probe measures, then per probe with selected tokens
    their median kept mass, the median p_y after / before one update with and without Lp-Reg and the
    median ratio of the two, and the same pooled over every probe (the run's mechanism numbers)."""
    rows = [r for r in rows if r["ratio_beta1"]]
    if not rows:
        return []
    lines = ["  mechanism: at each probed step, from the same state, one update with Lp-Reg (beta = 1) and one",
             "    without (beta = 0); per token Lp-Reg selects, p_y after / before each update, and their ratio",
             "    (> 1: Lp-Reg kept more of the token's probability). m = the proxy's kept mass at the token."]
    for row in rows:
        med = {k: median(row[k]) for k in ("ratio_beta1", "ratio_beta0", "kept_mass") if k in row}
        lines.append(f"    step {row['step']:>3}: {len(row['ratio_beta1']):>3} tokens, median m "
                     f"{format_number(med.get('kept_mass'))}, median p_y after / before {med['ratio_beta1']:.3f} with "
                     f"Lp-Reg, {med['ratio_beta0']:.3f} without; median ratio {median(token_ratios(row)):.3f}")
    ratios = [x for r in rows for x in token_ratios(r)]
    kept = [x for r in rows for x in r.get("kept_mass", [])]
    m = median(kept) if kept else math.nan
    lines.append(f"    all probes: {len(ratios)} tokens, median kept mass m {format_number(m)} (k3 pushes a selected "
                 f"token up by 1/m - 1 = {format_number(1 / m - 1 if kept else math.nan, '.2f')} per unit of "
                 f"negative advantage), median ratio {median(ratios):.3f}, higher with Lp-Reg for "
                 f"{100 * sum(x > 1 for x in ratios) / len(ratios):.0f}% of tokens")
    return lines
