"""The loop: a compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines), on one screen.

One step, top to bottom in `train` (each stage a module of its own):

    rollout       (lpreg.trainer.rollout) P prompts (global, all ranks) x n samples, HF `generate` at
                  temperature T, top_p 1, top_k 0, each prompt's group seeded by (seed, step, prompt
                  index); reward: math-verify against the gold answer in a killable worker (1 / 0);
                  advantage A = (R - mean_group) / (std_group + eps) (or batch std, or none) on the global
                  batch
    scoring_pass  (lpreg.trainer.scoring) only when needed: a no-grad forward fixing old log-probs, the
                  rollout policy's sparse proxy q (off-policy Lp-Reg) and the step-wide token choice
    instruments   the registered instruments' probes, from the state before the update, on copies
                  (lpreg.trainer.instruments; a study registers them)
    update        (lpreg.trainer.update) `mini_batches` optimizer steps per rollout (default 1:
                  on-policy; 8 for clip_higher and kl_cov, as published), each over micro-batches; the
                  loss is aggregated by `loss_agg_mode` exactly across micro-batches and ranks; grad clip
                  1.0; AdamW
    record        (lpreg.trainer.step) metrics.jsonl (verl names), samples.jsonl, progress bar; held-out
                  avg@k / pass@k every `eval_every` steps and, with `eval_start`, before the first
                  (lpreg.trainer.evaluate; the step-0 one cached by lpreg.trainer.eval_cache); per-problem
                  results in held_out.jsonl
    checkpoint    atomic, every `save_every` steps; `--resume auto` continues exactly
    end           PNG plots and the summary (lpreg.trainer.summary: held-out accuracy with a paired
                  interval, the departures from the paper, the instruments' lines)

The cross-rank helpers are lpreg.trainer.ranks. Set-up (policy, task, warm start or resume, optimizer,
files) is `lpreg.trainer.setup.setup`; the losses are `lpreg.trainer.losses.method_loss`; the config and
presets `lpreg.trainer.config`.

Lp-Reg (docs/spec.md §3; the released code's form by default, `--lpreg-compat paper` for Eq. 6):
loss_t = -min(r A, clip(r, 0, 10) A) + beta * S_t * D_t, S_t = [A < 0] & [p_y among the lowest rho]
& [y survives the min-p filter]. The proxy q is the current logits, detached, on-policy, and the
rollout policy's sparse top-k proxy off-policy (`--mini-batches > 1`). The paper form's rho-percentile
is step-wide (all micro-batches and ranks); the released form's is per micro-batch, as in its code.

Where this departs from the paper:
- The policy is whatever `--model` gives; the embedded default is a tiny character-level model
  warmed up by SFT on integer arithmetic (operands <= 19), so RL has a non-zero reward on a CPU
  in minutes. Its RL problem set is small (64 problems, each seen every 4 steps): a model this
  size barely generalises across problems, so reward rises by learning the problems it meets.
- Rollouts are generated one prompt group per `generate` call, so that samples do not depend on
  how prompts are sharded across ranks (a 2-rank run equals a 1-rank run at the same batch).
"""

import os
import time

import torch

from lpreg.trainer import instruments
from lpreg.trainer.config import TrainConfig
from lpreg.trainer.logging_utils import plot_metrics, read_metrics
from lpreg.trainer.rollout import rollout
from lpreg.trainer.scoring import scoring_pass
from lpreg.trainer.setup import Run, setup
from lpreg.trainer.step import HELD_OUT_FILE, held_out_eval, maybe_checkpoint, start_eval, step_metrics, write_logs
from lpreg.trainer.summary import format_summary, read_held_out
from lpreg.trainer.update import update

__all__ = ["train"]


def train(cfg: TrainConfig) -> torch.nn.Module:
    """Run the whole job described by `cfg`; returns the trained (unwrapped) policy."""
    run = setup(cfg)
    try:
        start_eval(run)
        for step in range(run.start_step, cfg.steps):
            t_step = time.perf_counter()
            ro = rollout(run, step)
            plan = scoring_pass(run, ro, step)
            measured = instruments.before_update(run, plan, step)  # {} unless one measures: the run is untouched
            t_update = time.perf_counter()
            sums, grad_norms = update(run, plan)
            timing = {"rollout": ro.seconds_generate, "reward": ro.seconds_reward,
                      "update": time.perf_counter() - t_update}
            timing["step"] = time.perf_counter() - t_step
            row = step_metrics(run, step, ro, plan, sums, grad_norms, timing)
            row.update(measured)
            row.update(held_out_eval(run, step))
            write_logs(run, step, ro, row)
            maybe_checkpoint(run, step)
    finally:
        run.close()
    _finish(run)
    return run.policy


def _finish(run: Run) -> None:
    """The figure and the end-of-run summary (main process)."""
    cfg, acc = run.cfg, run.acc
    if acc.is_main_process:
        rows = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
        path = plot_metrics({cfg.loss: rows}, os.path.join(cfg.output_dir, "training_curves.png"),
                            title=f"{cfg.preset}, loss={cfg.loss}") if cfg.plot else None
        acc.print(format_summary(rows, cfg.output_dir, cfg=cfg,
                                 held_out=read_held_out(os.path.join(cfg.output_dir, HELD_OUT_FILE)),
                                 figure=path, log_files=instruments.log_files(),
                                 extra_lines=instruments.summary_lines(cfg.output_dir)))
    acc.wait_for_everyone()
    acc.end_training()
