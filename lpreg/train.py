"""lpreg-train: the command line of the compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines).

The loop is `lpreg.trainer.loop.train` (a step, top to bottom, in its docstring); set-up (policy, task,
warm start or resume, optimizer, files) is `lpreg.trainer.setup.setup`; the losses are
`lpreg.trainer.losses.method_loss`; the config and presets `lpreg.trainer.config`.

This module is the trainer's composition: it imports `lpreg.experiments`, which registers the study's
tasks (`noisy-sparks`, `sparks`), presets (cpu-demo, cpu-regime-sweep, cpu-sparks, cpu-sparks-demo,
cpu-sweep) and instruments (the diversity metrics, the
mechanism probe) with the trainer's registration points. The loop itself imports no experiment.

Run:
    lpreg-train --preset cpu-demo                       # the main job: Lp-Reg at work, < 5 min on 2 cores
    lpreg-train --preset cpu-tiny                       # the negative control (and the test fixture)
    lpreg-train --preset cpu-tiny --loss grpo --output-dir runs/grpo
    lpreg-train --preset cpu-sparks                     # a subword noise tail + a rare "check" token
    python -m lpreg.experiments.compare --preset cpu-sweep ...   # the paired sweep (docs/cpu_sweep.md)
    lpreg-train --preset qwen2.5-math-1.5b --model /models/Qwen2.5-Math-1.5B --data train.parquet
    accelerate launch --num_processes 8 -m lpreg.train --preset ...   # GPUs: DDP (or FSDP via config)
    torchrun --nproc_per_node 2 -m lpreg.train --preset test-micro     # CPU processes (gloo)
Flags mirror the fields of `lpreg.trainer.config.TrainConfig`; `--config FILE.yaml` sets many.
"""

import dataclasses
import json
import sys

import lpreg.experiments  # noqa: F401  registers the study's task, presets and instruments (module docstring)
from lpreg.trainer.config import load_config
from lpreg.trainer.loop import train
from lpreg.trainer.setup import load_weights

__all__ = ["train", "main", "load_weights"]


def main(argv=None) -> int:
    """Console entry point `lpreg-train`; bad configuration exits with a one-line error."""
    try:
        cfg = load_config(argv)
    except ValueError as err:
        raise SystemExit(f"lpreg-train: error: {err}") from err
    log_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}
    print("lpreg-train config: " + json.dumps(log_cfg), file=sys.stderr, flush=True)
    try:
        train(cfg)
    except ValueError as err:
        raise SystemExit(f"lpreg-train: error: {err}") from err
    return 0


if __name__ == "__main__":
    main()
