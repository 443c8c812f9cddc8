"""Run several losses on the same preset and plot them side by side (the README's figure).

    python -m lpreg.trainer.compare --preset cpu-tiny --losses lpreg grpo \\
        --runs-dir runs/compare --figure docs/cpu_tiny_lpreg_vs_grpo.png

Each loss runs as its own `lpreg-train` process, one after the other, with the same seed, so
the runs share the warm start, the data order and the first step's rollouts; they diverge only
through their updates. A finished run (its metrics.jsonl holds every step) is reused, so the
figure can be redrawn without training again (`--reuse`). Extra flags after `--` go to every
run (e.g. `-- --steps 40`).

The figure has one panel per metric (reward, entropy, Lp-Reg selected fraction), raw values
faint and a moving average bold; a summary line per run (first/last 10-step mean reward and
entropy, wall time) is printed and written next to the figure as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from lpreg.trainer.config import LOSSES, PRESETS, make_config
from lpreg.trainer.logging_utils import plot_metrics, read_metrics

__all__ = ["run_losses", "summarise", "main"]


def _complete(run_dir, steps):
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return len(rows) >= steps and rows[-1]["step"] == steps


def run_losses(preset, losses, runs_dir, extra=(), reuse=True, log=print):
    """Train each loss (or reuse a finished run); returns {loss: (run_dir, wall seconds or None)}."""
    steps = make_config(preset).steps
    for i, flag in enumerate(extra):
        if flag == "--steps" and i + 1 < len(extra):
            steps = int(extra[i + 1])
    out = {}
    for loss in losses:
        run_dir = os.path.join(runs_dir, f"{preset}_{loss}")
        if reuse and _complete(run_dir, steps):
            log(f"{loss}: reusing {run_dir}")
            out[loss] = (run_dir, None)
            continue
        cmd = [sys.executable, "-m", "lpreg.train", "--preset", preset, "--loss", loss, "--output-dir", run_dir,
               "--resume", "none", "--progress", "false", *extra]
        log("$ " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        out[loss] = (run_dir, time.perf_counter() - t0)
    return out


def summarise(rows, window=10):
    """First / last `window`-step means of reward and entropy of one run's metric rows."""
    def mean(key, part):
        vals = [r[key] for r in part if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    head, tail = rows[:window], rows[-window:]
    return {
        "steps": len(rows),
        "reward_first": mean("critic/score/mean", head), "reward_last": mean("critic/score/mean", tail),
        "entropy_first": mean("actor/entropy", head), "entropy_last": mean("actor/entropy", tail),
        "lpreg_frac_mean": mean("actor/lpreg_frac", rows),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lpreg.trainer.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", choices=tuple(PRESETS))
    parser.add_argument("--losses", nargs="+", default=["lpreg", "grpo"], choices=LOSSES)
    parser.add_argument("--runs-dir", default="runs/compare")
    parser.add_argument("--figure", default="docs/cpu_tiny_lpreg_vs_grpo.png")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse runs whose metrics.jsonl is complete (default: yes)")
    args, extra = parser.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    runs = run_losses(args.preset, args.losses, args.runs_dir, extra, reuse=args.reuse)
    rows = {loss: read_metrics(os.path.join(d, "metrics.jsonl")) for loss, (d, _) in runs.items()}
    labels = {"lpreg": "Lp-Reg", "grpo": "GRPO"}
    path = plot_metrics({labels.get(k, k): v for k, v in rows.items()}, args.figure,
                        title=f"{args.preset}: " + " vs ".join(labels.get(k, k) for k in rows)
                        + (f"  ({' '.join(extra)})" if extra else ""))
    summary = {}
    for loss, (run_dir, wall) in runs.items():
        summary[loss] = {**summarise(rows[loss]), "wall_s": wall, "run_dir": run_dir}
        s = summary[loss]
        print(f"{loss:>14}: reward {s['reward_first']:.3f} -> {s['reward_last']:.3f} (10-step means), "
              f"entropy {s['entropy_first']:.3f} -> {s['entropy_last']:.3f}"
              + (f", {wall:.0f} s" if wall else ""))
    with open(os.path.splitext(path)[0] + ".json", "w") as fh:
        json.dump({"preset": args.preset, "extra_flags": extra, "runs": summary}, fh, indent=1)
    print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
