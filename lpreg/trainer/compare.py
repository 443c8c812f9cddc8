"""The sweep: several arms (a loss and its flags) x several seeds on one preset, one figure, one JSON.

    python -m lpreg.trainer.compare                      # cpu-sparks: 6 arms x 3 seeds, 2 jobs,
                                                         # docs/cpu_sparks_sweep.png and .json
    python -m lpreg.trainer.compare --arms grpo lpreg_released --seeds 0 -- --steps 20   # a pilot
    python -m lpreg.trainer.compare --preset cpu-tiny --arms grpo lpreg_released --seeds 0 1 2 \\
        --figure docs/cpu_tiny_lpreg_vs_grpo.png         # the negative control

Arms (`ARMS`, read from the loss table `lpreg.trainer.losses.LOSSES`; a bare loss name is also an
arm, with that loss's defaults): GRPO, Lp-Reg in the released code's form and in the paper's Eq. 6
form, the entropy bonus (coefficient 0.002, the paper's §5.1.2), 80/20 and clip-higher (off-policy:
8 updates per rollout, as published).

Each (arm, seed) runs as its own `lpreg-train` process (one torch thread), `--jobs` at a time.
The warm start is done once per seed and shared through `--warm-start-cache` (the arms differ
only after it, so the runs of one seed share the warm start, the data order and the first step's
rollouts): a seed's other runs start only once its first run has written the cache entry. A finished
run (its metrics.jsonl holds every step) is reused unless `--no-reuse`. Flags after `--` go to
every run.

The figure has one panel per metric in `BAND_KEYS`: the mean over seeds, a band from the lowest to
the highest seed. The JSON summary gives, per arm, the end-of-run values (last `--window` steps'
mean; the last held-out evaluation) per seed and their mean and spread (sample std) over seeds.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from lpreg.trainer.config import PRESETS, load_config, preset_config
from lpreg.trainer.logging_utils import plot_bands, read_metrics
from lpreg.trainer.losses import LOSSES
from lpreg.trainer.setup import warm_start_cache_dir

__all__ = ["ARMS", "LABELS", "BAND_KEYS", "arm_flags", "run_sweep", "summarise", "summarise_sweep", "main"]

# every arm of the loss table: {arm: lpreg-train flags}, and the labels of arms and bare losses
ARMS: Dict[str, List[str]] = {arm.name: ["--loss", loss, *arm.flags] for loss, spec in LOSSES.items()
                              for arm in spec.arms}
LABELS: Dict[str, str] = {**{loss: spec.label for loss, spec in LOSSES.items()},
                          **{arm.name: arm.label for spec in LOSSES.values() for arm in spec.arms}}
# (metrics.jsonl key, panel title); "train/lpreg_selected" is derived (summarise_rows)
BAND_KEYS = (("critic/score/mean", "train reward"), ("actor/entropy", "entropy (nats/token)"),
             ("spark/prob", "p(spark) at the first answer token"), ("eval/pass@8", "held-out pass@8"),
             ("eval/avg@8", "held-out avg@8"), ("train/distinct_answers", "distinct answers per group"),
             ("train/frac_reward_zero_std", "groups with zero reward std"),
             ("train/lpreg_selected", "Lp-Reg selected tokens per step"))


def arm_flags(arm: str) -> List[str]:
    """The lpreg-train flags of an arm (`ARMS`, or a bare loss name)."""
    if arm in ARMS:
        return list(ARMS[arm])
    if arm in LOSSES:
        return ["--loss", arm]
    raise ValueError(f"arm must be one of {tuple(ARMS)} or a loss {tuple(LOSSES)}, got {arm!r}")


def _complete(run_dir: str, steps: int) -> bool:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return len(rows) >= steps and rows[-1]["step"] == steps


def _steps(preset: str, extra: Sequence[str]) -> int:
    steps = preset_config(preset).steps
    for i, flag in enumerate(extra):
        if flag == "--steps" and i + 1 < len(extra):
            steps = int(extra[i + 1])
        elif flag.startswith("--steps="):
            steps = int(flag.split("=", 1)[1])
    return steps


def _cache_entry(preset: str, seed: int, cache: str, extra: Sequence[str]) -> Optional[str]:
    """The warm-start cache entry of `seed`'s runs (lpreg.trainer.setup's key; it hashes the
    warm-start data, so it is computed once per seed, not at every poll)."""
    return warm_start_cache_dir(load_config(["--preset", preset, *extra, "--seed", str(seed),
                                             "--warm-start-cache", cache]))


def run_sweep(preset: str, arms: Sequence[str], seeds: Sequence[int], runs_dir: str, extra: Sequence[str] = (),
              jobs: int = 1, reuse: bool = True, log=print) -> Dict[str, Dict[int, dict]]:
    """Train every (arm, seed), `jobs` processes at a time; returns {arm: {seed: {run_dir, wall_s}}}
    (wall_s None for a reused run)."""
    steps, cache = _steps(preset, extra), os.path.join(runs_dir, "warm_start_cache")
    todo, out = [], {a: {} for a in arms}
    for arm in arms:  # arm-major: the first runs of a sweep are one per seed
        for seed in seeds:
            run_dir = os.path.join(runs_dir, f"{preset}_{arm}_seed{seed}")
            out[arm][seed] = {"run_dir": run_dir, "wall_s": None}
            if reuse and _complete(run_dir, steps):
                log(f"{arm} seed {seed}: reusing {run_dir}")
                continue
            todo.append((arm, seed, [sys.executable, "-m", "lpreg.train", "--preset", preset, *arm_flags(arm),
                                     "--seed", str(seed), "--output-dir", run_dir, "--resume", "none",
                                     "--progress", "false", "--plot", "false", "--warm-start-cache", cache,
                                     "--torch-threads", "1", *extra]))
    running: List[tuple] = []
    entries = {s: _cache_entry(preset, s, cache, extra) for s in seeds}

    def cached(seed: int) -> bool:
        return entries[seed] is None or os.path.isfile(os.path.join(entries[seed], "warm_start.json"))

    warmed = {s for s in seeds if cached(s)}  # seeds whose warm start is cached
    while todo or running:
        while len(running) < max(1, jobs):
            # a seed's first run warm-starts and fills the cache: its other runs wait for the entry
            busy = {seed for _, seed, *_ in running if seed not in warmed}
            warmed |= {seed for seed in busy if cached(seed)}
            busy -= warmed
            ready = [i for i, (_, seed, _) in enumerate(todo) if seed not in busy]
            if not ready:
                break
            arm, seed, cmd = todo.pop(ready[0])
            log("$ " + " ".join(cmd[1:]))
            os.makedirs(out[arm][seed]["run_dir"], exist_ok=True)
            fh = open(os.path.join(out[arm][seed]["run_dir"], "train.log"), "w")
            running.append((arm, seed, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), time.time(), fh))
        time.sleep(0.5)
        for item in list(running):
            arm, seed, proc, t0, fh = item
            if proc.poll() is None:
                continue
            running.remove(item)
            fh.close()
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} seed {seed} failed ({proc.returncode}); see {fh.name}")
            warmed.add(seed)
            out[arm][seed]["wall_s"] = time.time() - t0
            log(f"{arm} seed {seed}: done in {out[arm][seed]['wall_s']:.0f} s")
    return out


def with_selected(rows: List[dict]) -> List[dict]:
    """Rows plus train/lpreg_selected = actor/lpreg_frac x train/n_tokens (tokens per step)."""
    return [{**r, "train/lpreg_selected": r.get("actor/lpreg_frac", 0.0) * r.get("train/n_tokens", 0)}
            for r in rows]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarise(rows: List[dict], window: int = 10) -> dict:
    """One run: first / last `window`-step means of the per-step metrics, the first and last held-out
    evaluation, and the mean Lp-Reg selected tokens per step."""
    rows = with_selected(rows)
    head, tail = rows[:window], rows[-window:]
    evals = [r for r in rows if "eval/pass@8" in r or "eval/avg@8" in r]
    out = {"steps": len(rows), "lpreg_selected_per_step": _mean([r["train/lpreg_selected"] for r in rows])}
    for key, name in (("critic/score/mean", "reward"), ("actor/entropy", "entropy"), ("spark/prob", "spark_prob"),
                      ("spark/usage", "spark_usage"), ("train/distinct_answers", "distinct_answers"),
                      ("train/frac_reward_zero_std", "frac_reward_zero_std")):
        out[f"{name}_first"] = _mean([r.get(key) for r in head])
        out[f"{name}_last"] = _mean([r.get(key) for r in tail])
    for key in ("eval/pass@8", "eval/avg@8", "eval/pass@1"):
        out[f"{key[5:]}_first"] = evals[0].get(key) if evals else None
        out[f"{key[5:]}_last"] = evals[-1].get(key) if evals else None
    return out


def _spread(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarise_sweep(rows: Dict[str, Dict[int, List[dict]]], window: int = 10) -> Dict[str, dict]:
    """{arm: {"per_seed": {seed: summarise(...)}, "mean": {...}, "spread": {...}}} (spread: the
    sample std over seeds, None with one seed)."""
    out = {}
    for arm, by_seed in rows.items():
        per_seed = {seed: summarise(r, window) for seed, r in by_seed.items()}
        keys = sorted({k for s in per_seed.values() for k in s})
        out[arm] = {"per_seed": per_seed,
                    "mean": {k: _mean([s.get(k) for s in per_seed.values()]) for k in keys},
                    "spread": {k: _spread([s.get(k) for s in per_seed.values()]) for k in keys}}
    return out


def _parse(argv) -> tuple:
    parser = argparse.ArgumentParser(prog="python -m lpreg.trainer.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-sparks", choices=tuple(PRESETS))
    parser.add_argument("--arms", "--losses", dest="arms", nargs="+", default=list(ARMS),
                        choices=tuple(dict.fromkeys(tuple(ARMS) + tuple(LOSSES))))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--runs-dir", default=None, help="default runs/<preset>")
    parser.add_argument("--figure", default=None, help="default docs/<preset>_sweep.png (and .json)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the end-of-run values")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse runs whose metrics.jsonl is complete (default: yes)")
    args, extra = parser.parse_known_args(argv)
    args.runs_dir = args.runs_dir or os.path.join("runs", args.preset)
    args.figure = args.figure or os.path.join("docs", f"{args.preset.replace('-', '_')}_sweep.png")
    return args, [x for x in extra if x != "--"]


def main(argv=None) -> int:
    args, extra = _parse(argv)
    t0 = time.time()
    runs = run_sweep(args.preset, args.arms, args.seeds, args.runs_dir, extra, jobs=args.jobs, reuse=args.reuse)
    rows = {arm: {s: read_metrics(os.path.join(r["run_dir"], "metrics.jsonl")) for s, r in by.items()}
            for arm, by in runs.items()}
    title = f"{args.preset}, {len(args.seeds)} seed(s): mean, band = min..max over seeds (5-step moving average)" + \
        (f"  ({' '.join(extra)})" if extra else "")
    path = plot_bands({LABELS.get(a, a): [with_selected(r) for r in by.values()] for a, by in rows.items()},
                      args.figure, keys=BAND_KEYS, title=title)
    summary = summarise_sweep(rows, args.window)
    for arm, s in summary.items():
        m = s["mean"]
        print(f"{arm:>15}: entropy {m['entropy_first']:.3f} -> {m['entropy_last']:.3f}, p(spark) "
              f"{m['spark_prob_first']:.4f} -> {m['spark_prob_last']:.4f}, held-out pass@8 "
              f"{m['pass@8_first']} -> {m['pass@8_last']}, selected/step {m['lpreg_selected_per_step']:.1f}")
        for seed, r in runs[arm].items():
            s["per_seed"][seed]["wall_s"] = r["wall_s"]
    with open(os.path.splitext(path)[0] + ".json", "w") as fh:
        json.dump({"preset": args.preset, "arms": {a: arm_flags(a) for a in args.arms}, "seeds": args.seeds,
                   "extra_flags": extra, "jobs": args.jobs, "sweep_wall_s": time.time() - t0, "runs": summary},
                  fh, indent=1)
    print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
