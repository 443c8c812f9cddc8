"""The sweep: several arms (a loss and its flags) x several seeds on one preset, figures, one JSON.

    python -m lpreg.experiments.compare --preset cpu-sweep --arms lpreg_released grpo 80_20 entropy_bonus \\
        --seeds 0 1 2 3 4 5 6 7 --mechanism-every 20 --figure docs/research/data/cpu_sweep.png   # the paired sweep
    python -m lpreg.experiments.compare                      # cpu-sparks: 6 arms x 3 seeds, 2 jobs,
                                                         # docs/research/data/cpu_sparks_sweep.png and .json
    python -m lpreg.experiments.compare --arms grpo lpreg_released --seeds 0 -- --steps 20   # a pilot
    python -m lpreg.experiments.compare --preset cpu-tiny --arms grpo lpreg_released --seeds 0 1 2 \\
        --figure docs/research/data/cpu_tiny_lpreg_vs_grpo.png         # the negative control

Arms (`ARMS`, read from the loss table `lpreg.trainer.losses.LOSSES`; a bare loss name is also an
arm, with that loss's defaults): GRPO, Lp-Reg in the released code's form and in the paper's Eq. 6
form, the entropy bonus (coefficient 0.002, the paper's §5.1.2), 80/20 and clip-higher (off-policy:
8 updates per rollout, as published).

Each (arm, seed) runs as its own `lpreg-train` process (one torch thread), `--jobs` at a time.
The warm start is done once per seed and shared through `--warm-start-cache` (the arms differ
only after it, so the runs of one seed share the warm start, the data order and the first step's
rollouts): a seed's other runs start only once its first run has written the cache entry. The
held-out evaluation before the first step (`--eval-start`) is the same for every arm of a seed, so
it too runs once per seed (`--eval-start-cache`; the seed's first run writes it before its first step). A finished
run (its metrics.jsonl holds every step) is reused unless `--no-reuse`. Flags after `--` go to
every run.

The figure has one panel per metric in `BAND_KEYS`: the mean over seeds, a band from the lowest to
the highest seed. The JSON summary gives, per arm, the end-of-run values (last `--window` steps'
mean; the last held-out evaluation) per seed, their mean and spread (sample std) over seeds, and
each run's wall and CPU seconds. With two seeds or more it also holds the paired analysis of
`--reference` (default Lp-Reg released) against every other arm (`lpreg.experiments.paired`: mean paired
difference, bootstrap 95% interval over seeds, Wilcoxon signed-rank p) on held-out pass@8 and avg@8,
entropy and p(spark) at the end, also written as a table (`<figure>_paired.md`).

`--mechanism-every N` adds `--mechanism-every N` to the runs of `--mechanism-arms` (default Lp-Reg
released): the direct measure of lpreg.experiments.mechanism. Its rows are pooled over seeds in the JSON
(`mechanism`) and drawn in `<figure>_mechanism.png`.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

from lpreg.experiments.mechanism_report import plot_mechanism, pool
from lpreg.experiments.paired import PAIRED_METRICS, paired_analysis, paired_table
from lpreg.trainer.config import PRESETS, load_config, preset_config
from lpreg.trainer.eval_cache import eval_start_cache_file
from lpreg.trainer.logging_utils import plot_bands, read_metrics
from lpreg.trainer.losses import LOSSES
from lpreg.trainer.setup import warm_start_cache_dir
from lpreg.trainer.summary import mean_of, with_selected
from lpreg.trainer.summary import summarise as summarise_run

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


# the study's per-step metrics (lpreg.experiments.diversity) the sweep summarises beside the trainer's
STUDY_WINDOW_KEYS = (("spark/prob", "spark_prob"), ("spark/usage", "spark_usage"),
                     ("train/distinct_answers", "distinct_answers"))


def summarise(rows: List[dict], window: int = 10) -> dict:
    """One run's summary (`lpreg.trainer.summary.summarise`) with the study's metrics."""
    return summarise_run(rows, window, extra_keys=STUDY_WINDOW_KEYS)


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


def _cache_files(preset: str, seed: int, cache: str, eval_cache: str, extra: Sequence[str]) -> List[str]:
    """What the first run of `seed` leaves for the others: its warm-start cache entry's
    warm_start.json (lpreg.trainer.setup's key; it hashes the warm-start data, so it is computed once
    per seed, not at every poll) and, with --eval-start, its step-0 evaluation (lpreg.trainer.eval_cache)."""
    cfg = load_config(["--preset", preset, *extra, "--seed", str(seed), "--warm-start-cache", cache,
                       "--eval-start-cache", eval_cache, "--torch-threads", "1"])
    entry = warm_start_cache_dir(cfg)
    files = [os.path.join(entry, "warm_start.json")] if entry is not None else []
    if cfg.eval_start:
        path = eval_start_cache_file(cfg)
        if path is not None:
            files.append(path)
    return files


def run_sweep(preset: str, arms: Sequence[str], seeds: Sequence[int], runs_dir: str, extra: Sequence[str] = (),
              jobs: int = 1, reuse: bool = True, log=print,
              arm_extra: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, Dict[int, dict]]:
    """Train every (arm, seed), `jobs` processes at a time; returns {arm: {seed: {run_dir, wall_s,
    cpu_s}}} (None for a reused run; cpu_s: the run's CPU seconds, its reward worker included).
    `arm_extra`: more flags for some arms' runs."""
    steps, cache = _steps(preset, extra), os.path.join(runs_dir, "warm_start_cache")
    eval_cache = os.path.join(runs_dir, "eval_start_cache")
    todo: List[tuple] = []
    out: Dict[str, Dict[int, dict]] = {a: {} for a in arms}
    for arm in arms:  # arm-major: the first runs of a sweep are one per seed
        for seed in seeds:
            run_dir = os.path.join(runs_dir, f"{preset}_{arm}_seed{seed}")
            out[arm][seed] = {"run_dir": run_dir, "wall_s": None, "cpu_s": None}
            if reuse and _complete(run_dir, steps):
                log(f"{arm} seed {seed}: reusing {run_dir}")
                continue
            todo.append((arm, seed, [sys.executable, "-m", "lpreg.train", "--preset", preset, *arm_flags(arm),
                                     "--seed", str(seed), "--output-dir", run_dir, "--resume", "none",
                                     "--progress", "false", "--plot", "false", "--warm-start-cache", cache,
                                     "--eval-start-cache", eval_cache,
                                     "--torch-threads", "1", *(arm_extra or {}).get(arm, ()), *extra]))
    running: List[tuple] = []
    entries = {s: _cache_files(preset, s, cache, eval_cache, extra) for s in seeds}

    def cached(seed: int) -> bool:
        return all(os.path.isfile(f) for f in entries[seed])

    warmed = {s for s in seeds if cached(s)}  # seeds whose warm start is cached
    while todo or running:
        while len(running) < max(1, jobs):
            # a seed's first run warm-starts and evaluates the start, filling both caches: its other runs
            # wait for them
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
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: the run's own CPU time as well
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            running.remove(item)
            fh.close()
            if proc.returncode != 0:
                raise RuntimeError(f"{arm} seed {seed} failed ({proc.returncode}); see {fh.name}")
            warmed.add(seed)
            out[arm][seed].update(wall_s=time.time() - t0, cpu_s=usage.ru_utime + usage.ru_stime)
            log(f"{arm} seed {seed}: done in {out[arm][seed]['wall_s']:.0f} s ({out[arm][seed]['cpu_s']:.0f} CPU-s)")
    return out


def _spread(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return None
    m = sum(present) / len(present)
    return (sum((v - m) ** 2 for v in present) / (len(present) - 1)) ** 0.5


def summarise_sweep(rows: Dict[str, Dict[int, List[dict]]], window: int = 10) -> Dict[str, dict]:
    """{arm: {"per_seed": {seed: summarise(...)}, "mean": {...}, "spread": {...}}} (spread: the
    sample std over seeds, None with one seed)."""
    out = {}
    for arm, by_seed in rows.items():
        per_seed = {seed: summarise(r, window) for seed, r in by_seed.items()}
        keys = sorted({k for s in per_seed.values() for k in s})
        out[arm] = {"per_seed": per_seed,
                    "mean": {k: mean_of([s.get(k) for s in per_seed.values()]) for k in keys},
                    "spread": {k: _spread([s.get(k) for s in per_seed.values()]) for k in keys}}
    return out


def _parse(argv) -> tuple:
    parser = argparse.ArgumentParser(prog="python -m lpreg.experiments.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu-sparks", choices=tuple(PRESETS))
    parser.add_argument("--arms", "--losses", dest="arms", nargs="+", default=list(ARMS),
                        choices=tuple(dict.fromkeys(tuple(ARMS) + tuple(LOSSES))))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    parser.add_argument("--runs-dir", default=None, help="default runs/<preset>")
    parser.add_argument("--figure", default=None, help="default docs/research/data/<preset>_sweep.png (and .json)")
    parser.add_argument("--window", type=int, default=10, help="steps averaged for the end-of-run values")
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse runs whose metrics.jsonl is complete (default: yes)")
    parser.add_argument("--reference", default="lpreg_released",
                        help="the arm compared seed by seed with every other (default lpreg_released)")
    parser.add_argument("--mechanism-every", type=int, default=0,
                        help="measure the mechanism every N steps in the --mechanism-arms runs (0: never)")
    parser.add_argument("--mechanism-arms", nargs="+", default=["lpreg_released"])
    args, extra = parser.parse_known_args(argv)
    if args.mechanism_every < 0:
        parser.error(f"--mechanism-every must be >= 0, got {args.mechanism_every}")
    args.runs_dir = args.runs_dir or os.path.join("runs", args.preset)
    args.figure = args.figure or os.path.join("docs", "research", "data", f"{args.preset.replace('-', '_')}_sweep.png")
    return args, [x for x in extra if x != "--"]


def _finite(obj):
    """`obj` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _report(args, runs, rows, extra, t0, load) -> tuple:
    """The JSON document of the sweep (settings, every run, the paired analysis, the mechanism
    pooled over seeds) and the mechanism rows {arm: {seed: rows}}."""
    summary = summarise_sweep(rows, args.window)
    for arm, s in summary.items():
        for seed, r in runs[arm].items():
            s["per_seed"][seed].update(wall_s=r["wall_s"], cpu_s=r["cpu_s"])
    doc = {"preset": args.preset, "arms": {a: arm_flags(a) for a in args.arms}, "seeds": args.seeds,
           "extra_flags": extra, "jobs": args.jobs, "mechanism_every": args.mechanism_every,
           "sweep_wall_s": time.time() - t0, "load_average": {"start": load, "end": list(os.getloadavg())},
           "cpus": os.cpu_count(), "runs": summary}
    if len(args.seeds) > 1 and args.reference in summary:
        doc["paired"] = {"reference": args.reference, "metrics": list(PAIRED_METRICS),
                         "vs": paired_analysis(summary, args.reference)}
    probes = {arm: {s: read_metrics(os.path.join(runs[arm][s]["run_dir"], "mechanism.jsonl")) for s in args.seeds}
              for arm in args.mechanism_arms if arm in runs and args.mechanism_every}
    doc["mechanism"] = {arm: pool(by_seed) for arm, by_seed in probes.items() if any(by_seed.values())}
    return doc, probes


def _print_report(doc: dict) -> None:
    for arm, s in doc["runs"].items():
        m = s["mean"]
        print(f"{arm:>15}: entropy {m['entropy_first']:.3f} -> {m['entropy_last']:.3f}, p(spark) "
              f"{m['spark_prob_first']:.4f} -> {m['spark_prob_last']:.4f}, held-out pass@8 "
              f"{m['pass@8_first']} -> {m['pass@8_last']}, selected/step {m['lpreg_selected_per_step']:.1f}")
    if "paired" in doc:
        print(paired_table(doc["paired"]["vs"], doc["paired"]["reference"], LABELS))
    for arm, m in doc["mechanism"].items():
        a = m["all"]
        print(f"mechanism ({arm}, {a['n_tokens']} selected tokens): median p_y after / before one update "
              f"{a['ratio_beta1']['q50']:.3f} (beta = 1) vs {a['ratio_beta0']['q50']:.3f} (beta = 0); pushed down: "
              f"{a['frac_down_beta1']:.2f} vs {a['frac_down_beta0']:.2f}")


def main(argv=None) -> int:
    args, extra = _parse(argv)
    t0, load = time.time(), list(os.getloadavg())
    arm_extra = {arm: ["--mechanism-every", str(args.mechanism_every)] for arm in args.mechanism_arms} \
        if args.mechanism_every else {}
    runs = run_sweep(args.preset, args.arms, args.seeds, args.runs_dir, extra, jobs=args.jobs, reuse=args.reuse,
                     arm_extra=arm_extra)
    rows = {arm: {s: read_metrics(os.path.join(r["run_dir"], "metrics.jsonl")) for s, r in by.items()}
            for arm, by in runs.items()}
    title = f"{args.preset}, {len(args.seeds)} seed(s): mean, band = min..max over seeds (5-step moving average)" + \
        (f"  ({' '.join(extra)})" if extra else "")
    path = plot_bands({LABELS.get(a, a): [with_selected(r) for r in by.values()] for a, by in rows.items()},
                      args.figure, keys=BAND_KEYS, title=title)
    doc, probes = _report(args, runs, rows, extra, t0, load)
    stem = os.path.splitext(path)[0]
    for arm, by_seed in probes.items():
        if arm in doc["mechanism"]:
            doc["mechanism"][arm]["figure"] = plot_mechanism(
                by_seed, f"{stem}_mechanism.png" if len(probes) == 1 else f"{stem}_mechanism_{arm}.png",
                title=f"{args.preset}, {LABELS.get(arm, arm)}, {len(args.seeds)} seed(s): p_y of the selected tokens")
    with open(stem + ".json", "w") as fh:
        json.dump(_finite(doc), fh, indent=1)
    if "paired" in doc:
        with open(stem + "_paired.md", "w") as fh:
            fh.write(f"Generated by `python -m lpreg.experiments.compare` ({stem}.json): paired over seeds.\n\n"
                     + paired_table(doc["paired"]["vs"], doc["paired"]["reference"], LABELS) + "\n")
    _print_report(doc)
    print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
