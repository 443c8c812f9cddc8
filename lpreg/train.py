"""lpreg-train: the command line of the compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines).

The loop is `lpreg.trainer.loop.train` (a step, top to bottom, in its docstring); set-up (policy, task,
warm start or resume, optimizer, files) is `lpreg.trainer.setup.setup`; the losses are
`lpreg.trainer.losses.method_loss`; the config and presets `lpreg.trainer.config`.

This module is the trainer's composition. It loads no study code unless a study name is asked for:
`STUDY_NAMES` lists the names `lpreg.experiments` registers (tasks, presets, the output transform, the
option), each mapped to that package through the trainer's lazy table
(`lpreg.trainer.registry.register_lazy`), so `--preset cpu-sparks`, `--task sparks`, `--mechanism-every`
or `--output-transform output_floor:...` imports it, and `--preset cpu-demo` does not. The loop itself
imports no experiment.

Run:
    lpreg-train --preset cpu-demo                       # the main job, < 5 min on 2 cores
    lpreg-train --preset cpu-tiny                       # the negative control (and the test fixture)
    lpreg-train --preset cpu-tiny --loss grpo --output-dir runs/grpo
    lpreg-train --preset cpu-sparks                     # a study preset: a subword noise tail + a rare "check" token
    python -m lpreg.experiments.compare --preset cpu-sweep ...   # the paired sweep (docs/research/cpu_sweep.md)
    lpreg-train --preset qwen2.5-math-1.5b --model /models/Qwen2.5-Math-1.5B --data train.parquet
    accelerate launch --num_processes 8 -m lpreg.train --preset ...   # GPUs: DDP (or FSDP via config)
    torchrun --nproc_per_node 2 -m lpreg.train --preset test-micro     # CPU processes (gloo)
Flags mirror the fields of `lpreg.trainer.config.TrainConfig`; `--config FILE.yaml` sets many.
"""

import dataclasses
import json
import sys

from lpreg.trainer.config import load_config
from lpreg.trainer.loop import train
from lpreg.trainer.registry import register_lazy
from lpreg.trainer.setup import load_weights

__all__ = ["train", "main", "load_weights", "STUDY_NAMES", "STUDY_MODULE"]

STUDY_MODULE = "lpreg.experiments"  # importing it registers every name below
STUDY_NAMES = {
    "preset": ("cpu-sparks", "cpu-sweep", "cpu-sparks-demo", "noisy-sparks-demo", "cpu-regime-sweep"),
    "task": ("sparks", "noisy-sparks"),
    "output_transform": ("output_floor",),
    "option": ("mechanism_every",),
}
for _kind, _names in STUDY_NAMES.items():
    for _name in _names:
        register_lazy(_kind, _name, STUDY_MODULE)


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
