"""After the update: the step's record. Its metrics.jsonl row, the held-out evaluation, the logs and the
checkpoint (the step's earlier stages: lpreg.trainer.rollout, .scoring, .update; the loop:
lpreg.trainer.loop.train).

    step_metrics   the metrics.jsonl row (verl names)
    start_eval     with --eval-start, the held-out evaluation before the first step (the step-0 row),
                   cached across a sweep's arms by lpreg.trainer.eval_cache
    held_out_eval  avg@k / pass@k / maj@k on held-out problems every `eval_every` steps and at the end;
                   per-problem correct counts in held_out.jsonl
    write_logs     metrics.jsonl, samples.jsonl, the progress bar
    maybe_checkpoint
"""

import json
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer import eval_cache, instruments
from lpreg.trainer.evaluate import evaluate, held_out_seed
from lpreg.trainer.logging_utils import format_row
from lpreg.trainer.losses import summarise_loss_metrics
from lpreg.trainer.ranks import full_params_for_generation, gather_floats
from lpreg.trainer.rollout import Rollout
from lpreg.trainer.scoring import StepPlan

__all__ = ["HELD_OUT_FILE", "step_metrics", "start_eval", "held_out_eval", "write_logs", "maybe_checkpoint"]

HELD_OUT_FILE = "held_out.jsonl"  # per held-out evaluation: each problem's correct samples


def step_metrics(run, step: int, ro: Rollout, plan: StepPlan, sums, grad_norms, timing: Dict[str, float]) -> dict:
    """The metrics.jsonl row of a step (every rank calls this: it gathers across ranks)."""
    acc = run.acc
    keys = sorted(sums)
    totals = torch.stack([sums[k].reshape(()) for k in keys]).to(acc.device)
    if acc.num_processes > 1:
        totals = acc.reduce(totals, reduction="sum")
    lengths = gather_floats(acc, [float(len(r)) for r in ro.responses])
    eos_set = set(run.eos_ids)
    clipped = gather_floats(acc, [float(not r or r[-1] not in eos_set) for r in ro.responses])
    info = ro.reward_info
    counts = gather_floats(acc, [float(info.get("timeouts", 0)), float(info.get("parse_failures", 0))])
    return {
        "step": step + 1,
        "critic/score/mean": float(np.mean(ro.all_scores)),
        "critic/score/max": float(np.max(ro.all_scores)),
        "critic/score/min": float(np.min(ro.all_scores)),
        **summarise_loss_metrics(dict(zip(keys, totals.cpu().tolist())), plan.n_tokens),
        **ro.adv_metrics,
        "actor/grad_norm": float(np.mean(grad_norms)),
        "actor/lr": run.scheduler.get_last_lr()[0],
        "response_length/mean": float(np.mean(lengths)),
        "response_length/max": float(np.max(lengths)),
        "response_length/clip_ratio": float(np.mean(clipped)),
        "reward/timeouts": int(sum(counts[0::2])),
        "reward/parse_failures": int(sum(counts[1::2])),
        "train/n_tokens": plan.n_tokens,
        "train/scoring_pass": int(plan.scored),
        "train/updates_per_rollout": len(plan.micro),
        **instruments.step_metrics(run, ro),  # a study's per-step metrics, when registered
        **{f"timing/{k}_s": v for k, v in timing.items()},
    }


def start_eval(run) -> None:
    """With --eval-start, the held-out evaluation of the policy before the first step, written as
    the step-0 row of metrics.jsonl (a fresh run only: a resumed one has it already). With
    --eval-start-cache it is read from, or written to, that cache (lpreg.trainer.eval_cache)."""
    if not run.cfg.eval_start or run.start_step > 0:
        return
    path = eval_cache.eval_start_cache_file(run.cfg)
    entry = eval_cache.read_cached(path)
    if entry is not None:
        run.bar.write(f"held-out evaluation at step 0: loaded {path}")
    else:
        row, correct = _evaluate(run, -1)
        entry = {"row": {"step": 0, **row}, "correct": correct}
        if path is not None and run.acc.is_main_process:
            eval_cache.write_cached(path, entry)
    if run.acc.is_main_process:
        row = entry["row"]
        run.metrics_log.write(row)
        _write_held_out(run, 0, entry["correct"])
        run.bar.write(format_row(row, keys=sorted(k for k in row if k.startswith("eval/"))))


def held_out_eval(run, step: int) -> Dict[str, float]:
    """avg@k, pass@1..k and maj@k on the held-out problems every `eval_every` steps and at the last
    step, as metrics-row entries; each problem's number of correct samples goes to held_out.jsonl
    (the end-of-run summary's paired interval)."""
    cfg = run.cfg
    if not cfg.eval_every or not ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        return {}
    row, correct = _evaluate(run, step)
    if run.acc.is_main_process:
        _write_held_out(run, step + 1, correct)
    return row


def _evaluate(run, step: int) -> Tuple[Dict[str, float], List[int]]:
    """(eval/* entries, correct samples per problem) of the held-out evaluation after `step` (-1: before
    the first), on the main process (the others wait and get ({}, [])). Sampling at the rollout
    temperature, under a forked RNG seeded by (seed, step), so training's random streams are untouched;
    `lpreg-eval --checkpoint` repeats it exactly."""
    cfg, acc = run.cfg, run.acc
    out: Dict[str, float] = {}
    correct: List[int] = []
    with full_params_for_generation(acc, run.model):
        if acc.is_main_process:
            m = evaluate(run.policy, run.tok, run.eval_problems, k=cfg.eval_k, temperature=cfg.temperature,
                         greedy=False, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.micro_batch_size,
                         seed=held_out_seed(cfg.seed, step), reward_worker=run.reward_worker, return_records=True)
            correct = [int(round(sum(r["rewards"]))) for r in m.pop("records")]
            out = {f"eval/{k}": v for k, v in m.items() if "@" in k}
    acc.wait_for_everyone()
    return out, correct


def _write_held_out(run, step: int, correct: List[int]) -> None:
    """One row of held_out.jsonl: the step (0 = before the first) and each held-out problem's correct
    samples out of eval_k, in the held-out set's order."""
    with open(os.path.join(run.cfg.output_dir, HELD_OUT_FILE), "a") as fh:
        fh.write(json.dumps({"step": step, "k": run.cfg.eval_k, "correct": correct}) + "\n")


def write_logs(run, step: int, ro: Rollout, row: dict) -> None:
    """metrics.jsonl, the progress bar and, every `sample_every` steps, samples.jsonl."""
    cfg = run.cfg
    if not run.acc.is_main_process:
        return
    run.metrics_log.write(row)
    run.bar.update(1)
    run.bar.set_postfix(reward=f"{row['critic/score/mean']:.3f}", H=f"{row['actor/entropy']:.3f}")
    if cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step == run.start_step):
        n = cfg.samples_per_prompt
        with open(run.samples_path, "a") as fh:
            for q, a, t, s in list(zip(ro.questions, ro.answers, ro.texts, ro.scores))[: 2 * n]:
                row_ = {"step": step + 1, "question": q, "answer": a, "completion": t, "reward": s}
                fh.write(json.dumps(row_) + "\n")
        run.bar.write(format_row(row))


def maybe_checkpoint(run, step: int) -> None:
    """An atomic checkpoint every `save_every` steps and at the last one."""
    cfg, acc = run.cfg, run.acc
    if not (step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
        return
    state_dict = acc.get_state_dict(run.model)
    if acc.is_main_process:
        ckpt.save_checkpoint(cfg.output_dir, step + 1, model=run.policy, tokenizer=run.tok, optimizer=run.optimizer,
                             scheduler=run.scheduler, data_position=(step + 1) * cfg.prompts_per_step, config=cfg,
                             keep=cfg.keep_checkpoints, state_dict=state_dict)
    acc.wait_for_everyone()
