"""A run in a few numbers: the end-of-run summary of `lpreg-train` and the per-run rows of the sweep.

`summarise(rows)` reads a run's metrics.jsonl rows: first / last `window`-step means of the per-step
metrics (reward, entropy, and any `extra_keys` a study logs), the first and last held-out evaluation (the
step-0 row of `--eval-start` is the first), and Lp-Reg's selected tokens per step (`actor/lpreg_frac` x
`train/n_tokens`): their mean, and the share of steps that selected any. The sweep pools it over seeds
(lpreg.experiments.compare).

`format_summary` is what `lpreg-train` prints when a run ends:
- held-out accuracy (avg@k) at step 0 and at the end, with a paired 95% interval over the held-out
  problems of the difference (lpreg.trainer.stats.paired_interval on each problem's accuracy, from
  held_out.jsonl) and the number of problems;
- whether train reward rose (the first against the last `window` steps);
- the share of steps on which Lp-Reg selected tokens;
- every setting of the run that departs from the paper's recipe (`departures`, from the config);
- what the run does not show: RL's gain is not Lp-Reg's. Separating Lp-Reg from GRPO takes the paired
  sweep (arms x seeds), not one run.
The instruments (`lpreg.trainer.instruments`) add their own lines.
"""

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lpreg.trainer.stats import PairedInterval, paired_interval

__all__ = ["with_selected", "mean_of", "summarise", "format_summary", "format_number", "departures",
           "read_held_out", "held_out_interval", "PAPER_RECIPE"]

# (metrics.jsonl key, summary name) of the per-step metrics averaged over the first / last window
WINDOW_KEYS = (("critic/score/mean", "reward"), ("actor/entropy", "entropy"),
               ("train/frac_reward_zero_std", "frac_reward_zero_std"))
EVAL_KEYS = ("eval/pass@8", "eval/avg@8", "eval/pass@1")

# The paper's recipe (docs/spec.md §3): the settings a run is compared with, field by field. The policy
# and data are the paper's own (a pretrained Qwen2.5-Math model; its math training set), described in
# `departures`; the steps are the `qwen2.5-math-1.5b` preset's.
PAPER_RECIPE: Dict[str, Any] = {
    "loss": "lpreg", "lpreg_rho": 0.01, "lpreg_threshold": 0.02, "lpreg_mode": "min_p", "lpreg_beta": 1.0,
    "lpreg_clip_low": 1.0, "lpreg_clip_high": 9.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
    "samples_per_prompt": 8, "prompts_per_step": 256, "lr": 1e-6, "lr_warmup_steps": 0, "grad_clip": 1.0,
    "mini_batches": 1, "steps": 500, "std_scaling": "group", "max_new_tokens": 3072,
}
_LABELS = {"loss": "loss", "lpreg_rho": "rho", "lpreg_threshold": "kappa (min-p)", "lpreg_mode": "proxy filter",
           "lpreg_beta": "beta", "lpreg_clip_low": "ratio clip low", "lpreg_clip_high": "ratio clip high",
           "temperature": "temperature", "top_p": "top-p", "top_k": "top-k", "samples_per_prompt": "group size",
           "prompts_per_step": "prompts per step", "lr": "learning rate", "lr_warmup_steps": "lr warm-up steps",
           "grad_clip": "gradient clip", "mini_batches": "updates per rollout", "steps": "RL steps",
           "std_scaling": "advantage std scaling", "max_new_tokens": "max response tokens"}


def departures(cfg: Any) -> List[str]:
    """Every setting of `cfg` (a TrainConfig) that departs from the paper's recipe (`PAPER_RECIPE`, the
    policy, the data, any output transform), one line each, computed from the config."""
    out = []
    if cfg.model is None:
        out.append(f"policy: a tiny model built in code ({cfg.num_layers} layers x {cfg.hidden_size} wide), "
                   f"warm-started by {cfg.warmup_steps} SFT steps; the paper: a pretrained Qwen2.5-Math model")
    else:
        out.append(f"policy: {cfg.model} (the paper: Qwen2.5-Math-1.5B / 7B)")
    if cfg.data is None:
        out.append(f"task: the built-in task {cfg.task!r}; the paper: competition math")
    if cfg.output_transform:
        out.append(f"output transform {cfg.output_transform!r}: a change of the policy's output distribution "
                   f"that the paper's policy does not have (saved with the checkpoints)")
    if cfg.loss == "lpreg" and cfg.lpreg_compat != "paper":
        out.append(f"Lp-Reg form: {cfg.lpreg_compat} (the authors' released code; the paper's Eq. 6 is "
                   f"--lpreg-compat paper, docs/spec.md §3)")
    lpreg_only = {k for k in PAPER_RECIPE if k.startswith("lpreg_")}
    for key, paper in PAPER_RECIPE.items():
        if key in lpreg_only and cfg.loss != "lpreg":
            continue
        ours = getattr(cfg, key)
        if ours != paper:
            out.append(f"{_LABELS[key]}: {ours} (the paper: {paper})")
    for name, value in sorted(getattr(cfg, "options", {}).items()):
        out.append(f"study option {name}: {value} (not in the paper)")
    return out


def with_selected(rows: List[dict]) -> List[dict]:
    """Rows plus train/lpreg_selected = actor/lpreg_frac x train/n_tokens (tokens per step); the
    step-0 row of `--eval-start` (no training step) is left as it is."""
    return [{**r, "train/lpreg_selected": r.get("actor/lpreg_frac", 0.0) * r.get("train/n_tokens", 0)}
            if r["step"] >= 1 else r for r in rows]


def mean_of(values: Sequence[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def summarise(rows: List[dict], window: int = 10, extra_keys: Sequence[Tuple[str, str]] = ()) -> dict:
    """One run: first / last `window`-step means of the per-step metrics (WINDOW_KEYS and `extra_keys`,
    pairs of (metrics.jsonl key, summary name)), the first and last held-out evaluation, and Lp-Reg's
    selected tokens per step (mean; share of steps with any)."""
    steps = with_selected([r for r in rows if r["step"] >= 1])  # not the step-0 row (`--eval-start`)
    head, tail = steps[:window], steps[-window:]
    evals = [r for r in rows if any(k in r for k in EVAL_KEYS)]
    selected = [r["train/lpreg_selected"] for r in steps]
    out: Dict[str, Any] = {"steps": len(steps), "lpreg_selected_per_step": mean_of(selected),
                           "frac_steps_selecting": mean_of([float(s > 0) for s in selected])}
    for key, name in (*WINDOW_KEYS, *extra_keys):
        out[f"{name}_first"] = mean_of([r.get(key) for r in head])
        out[f"{name}_last"] = mean_of([r.get(key) for r in tail])
    for key in EVAL_KEYS:
        out[f"{key[5:]}_first"] = evals[0].get(key) if evals else None
        out[f"{key[5:]}_last"] = evals[-1].get(key) if evals else None
    out["eval_step_first"] = evals[0]["step"] if evals else None
    out["eval_step_last"] = evals[-1]["step"] if evals else None
    return out


def format_number(value, fmt: str = ".3f") -> str:
    """`value` formatted, or "n/a" for None and NaN."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


_num = format_number


def read_held_out(path: str) -> List[dict]:
    """The rows of a run's held_out.jsonl ({"step", "k", "correct": per problem}); [] without the file."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def held_out_interval(held_out: List[dict], *, level: float = 0.95) -> Optional[Tuple[int, int, PairedInterval]]:
    """(first step, last step, the paired interval of accuracy last - first over the held-out problems)
    from held_out.jsonl's first and last rows; None with fewer than two evaluations of the same problems."""
    if len(held_out) < 2:
        return None
    first, last = held_out[0], held_out[-1]
    if len(first["correct"]) != len(last["correct"]) or not first["correct"]:
        return None
    before = [c / first["k"] for c in first["correct"]]
    after = [c / last["k"] for c in last["correct"]]
    return first["step"], last["step"], paired_interval(before, after, level=level)


def format_summary(rows: List[dict], output_dir: str, *, cfg: Any = None, held_out: Optional[List[dict]] = None,
                   window: int = 10, figure: Optional[str] = None, extra_lines: Sequence[str] = (),
                   log_files: Sequence[str] = ()) -> str:
    """The end-of-run summary (module docstring): held-out accuracy at step 0 and the end with a paired
    95% interval over problems (`held_out`: held_out.jsonl's rows), whether train reward rose, Lp-Reg's
    selected tokens, the departures from the paper (`cfg`), what the run does not show, `extra_lines`
    (the instruments'), and where the figure and the logs are (metrics.jsonl, samples.jsonl, `log_files`)."""
    s = summarise(rows, window)
    n = s["steps"]
    w = min(window, n)
    rose = s["reward_last"] > s["reward_first"] if n else False
    lines = [f"summary ({n} steps; start / end = mean of the first / last {w} steps):",
             f"  train reward         {_num(s['reward_first'])} -> {_num(s['reward_last'])}   "
             f"({'rose' if rose else 'did not rise'})",
             f"  entropy (nats/token) {_num(s['entropy_first'])} -> {_num(s['entropy_last'])}"]
    lines += _held_out_lines(rows, s, held_out or [])
    if cfg is None or cfg.loss == "lpreg":
        lines.append(f"  Lp-Reg selected      {_num(s['lpreg_selected_per_step'], '.1f')} tokens per step on average; "
                     f"on {_num(100 * s['frac_steps_selecting'], '.0f')}% of steps")
    lines += list(extra_lines)
    if cfg is not None:
        found = departures(cfg)
        lines.append(f"  departures from the paper's recipe ({len(found)}):")
        lines += [f"    - {d}" for d in found]
        other = "Lp-Reg's part from GRPO's" if cfg.loss == "lpreg" else f"{cfg.loss}'s part from another loss's"
        lines.append(f"  what this run shows: what RL did with this loss. It does not separate {other}: that")
        lines.append("    needs the same job with --loss grpo on the same seeds, compared pair by pair (the sweep, "
                     "docs/trainer.md).")
    files = [os.path.join(output_dir, name)
             for name in ("metrics.jsonl", "samples.jsonl", "held_out.jsonl", "skipped_rows.jsonl", *log_files)]
    if figure:
        lines.append(f"  figure: {figure}")
    lines.append("  logs:   " + ", ".join(p for p in files if os.path.exists(p)))
    return "\n".join(lines)


def _held_out_lines(rows: List[dict], s: dict, held_out: List[dict]) -> List[str]:
    lines = []
    found = held_out_interval(held_out)
    if found is not None:
        first, last, ci = found
        k = held_out[-1]["k"]
        mean_first = sum(held_out[0]["correct"]) / (k * ci.n)
        mean_last = sum(held_out[-1]["correct"]) / (k * ci.n)
        verdict = ("above" if ci.low > 0 else "below") if ci.excludes_zero() else "not distinguishable from"
        lines.append(f"  held-out avg@{k}       {mean_first:.3f} (step {first}) -> {mean_last:.3f} (step {last}): "
                     f"{ci.mean:+.3f}, paired {100 * ci.level:.0f}% interval [{ci.low:+.3f}, {ci.high:+.3f}] over "
                     f"{ci.n} held-out problems")
        lines.append(f"    (the end is {verdict} the start for these problems under this seed; the interval "
                     f"leaves out the spread between seeds)")
    elif held_out:
        lines.append(f"  held-out avg@{held_out[-1]['k']}: one evaluation (step {held_out[-1]['step']}); "
                     f"--eval-start adds step 0, and the paired interval")
    if s["pass@8_first"] is not None:
        lines.append(f"  held-out pass@8      {_num(s['pass@8_first'])} -> {_num(s['pass@8_last'])}   "
                     f"avg@8 {_num(s['avg@8_first'])} -> {_num(s['avg@8_last'])}   "
                     f"(step {s['eval_step_first']} -> step {s['eval_step_last']})")
    elif found is None and any("eval/" in k for r in rows for k in r):
        keys = sorted({k for r in rows for k in r if k.startswith("eval/avg@")})
        lines.append(f"  held-out {keys[0][5:]}: " + " -> ".join(_num(r.get(keys[0])) for r in rows if keys[0] in r))
    return lines
