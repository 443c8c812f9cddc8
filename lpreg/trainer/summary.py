"""A run in a few numbers: the end-of-run summary of `lpreg-train` and the per-run rows of the sweep.

`summarise(rows)` reads a run's metrics.jsonl rows: first / last `window`-step means of the per-step
metrics (reward, entropy, p(spark), ...), the first and last held-out evaluation (the step-0 row of
`--eval-start` is the first), and Lp-Reg's selected tokens per step (`actor/lpreg_frac` x
`train/n_tokens`): their mean, and the share of steps that selected any. `format_summary` is what
`lpreg-train` prints when a run ends; the instruments (`lpreg.trainer.instruments`) add their own lines
(the mechanism probes: lpreg.experiments.mechanism). The sweep pools `summarise` over seeds
(lpreg.experiments.compare).
"""

import math
import os
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["with_selected", "mean_of", "summarise", "format_summary", "format_number"]

# (metrics.jsonl key, summary name) of the per-step metrics averaged over the first / last window
WINDOW_KEYS = (("critic/score/mean", "reward"), ("actor/entropy", "entropy"), ("spark/prob", "spark_prob"),
               ("spark/usage", "spark_usage"), ("train/distinct_answers", "distinct_answers"),
               ("train/frac_reward_zero_std", "frac_reward_zero_std"))
EVAL_KEYS = ("eval/pass@8", "eval/avg@8", "eval/pass@1")


def with_selected(rows: List[dict]) -> List[dict]:
    """Rows plus train/lpreg_selected = actor/lpreg_frac x train/n_tokens (tokens per step); the
    step-0 row of `--eval-start` (no training step) is left as it is."""
    return [{**r, "train/lpreg_selected": r.get("actor/lpreg_frac", 0.0) * r.get("train/n_tokens", 0)}
            if r["step"] >= 1 else r for r in rows]


def mean_of(values: Sequence[Optional[float]]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")


def summarise(rows: List[dict], window: int = 10) -> dict:
    """One run: first / last `window`-step means of the per-step metrics, the first and last held-out
    evaluation, and Lp-Reg's selected tokens per step (mean; share of steps with any)."""
    steps = with_selected([r for r in rows if r["step"] >= 1])  # not the step-0 row (`--eval-start`)
    head, tail = steps[:window], steps[-window:]
    evals = [r for r in rows if any(k in r for k in EVAL_KEYS)]
    selected = [r["train/lpreg_selected"] for r in steps]
    out: Dict[str, Any] = {"steps": len(steps), "lpreg_selected_per_step": mean_of(selected),
                           "frac_steps_selecting": mean_of([float(s > 0) for s in selected])}
    for key, name in WINDOW_KEYS:
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


def format_summary(rows: List[dict], output_dir: str, *, window: int = 10, figure: Optional[str] = None,
                   extra_lines: Sequence[str] = (), log_files: Sequence[str] = ()) -> str:
    """The end-of-run summary: reward, entropy and held-out accuracy at the start and the end,
    Lp-Reg's selected tokens per step, p(spark) when the run logged it, `extra_lines` (the
    instruments'), and where the figure and the logs are (metrics.jsonl, samples.jsonl, `log_files`)."""
    s = summarise(rows, window)
    n = s["steps"]
    w = min(window, n)
    lines = [f"summary ({n} steps; start / end = mean of the first / last {w} steps):",
             f"  train reward         {_num(s['reward_first'])} -> {_num(s['reward_last'])}",
             f"  entropy (nats/token) {_num(s['entropy_first'])} -> {_num(s['entropy_last'])}"]
    if s["pass@8_first"] is not None:
        lines.append(f"  held-out pass@8      {_num(s['pass@8_first'])} -> {_num(s['pass@8_last'])}   "
                     f"avg@8 {_num(s['avg@8_first'])} -> {_num(s['avg@8_last'])}   "
                     f"(step {s['eval_step_first']} -> step {s['eval_step_last']})")
    elif any("eval/" in k for r in rows for k in r):
        keys = sorted({k for r in rows for k in r if k.startswith("eval/avg@")})
        lines.append(f"  held-out {keys[0][5:]}: " + " -> ".join(_num(r.get(keys[0])) for r in rows if keys[0] in r))
    if s["spark_prob_first"] == s["spark_prob_first"]:  # not NaN: the task has a spark token
        lines.append(f"  p(spark)             {_num(s['spark_prob_first'], '.4f')} -> "
                     f"{_num(s['spark_prob_last'], '.4f')}")
    lines.append(f"  Lp-Reg selected      {_num(s['lpreg_selected_per_step'], '.1f')} tokens per step on average; "
                 f"on {_num(100 * s['frac_steps_selecting'], '.0f')}% of steps")
    lines += list(extra_lines)
    files = [os.path.join(output_dir, name) for name in ("metrics.jsonl", "samples.jsonl", *log_files)]
    if figure:
        lines.append(f"  figure: {figure}")
    lines.append("  logs:   " + ", ".join(p for p in files if os.path.exists(p)))
    return "\n".join(lines)
