"""One training step, in the order `lpreg.train.train` runs it.

    rollout        this rank's prompts, n samples each; rewards; group advantages (global batch)
    scoring_pass   pack the step; when needed, one no-grad forward fixing the old log-probs,
                   the rollout policy's sparse proxy q and the step-wide token choice
    update         mini-batches x micro-batches of forward + backward, one optimizer step each
    step_metrics   the metrics.jsonl row (verl names)
    held_out_eval  avg@k / pass@k / maj@k on held-out problems every `eval_every` steps
    write_logs, maybe_checkpoint

When does the scoring pass run? Only when something must be known for the whole step before
the first gradient: when the step is off-policy (`--mini-batches > 1`: later mini-batches need the
rollout policy's log-probs and, for Lp-Reg, its proxy q, docs/spec.md §1; decided once, in
`StepPlan.off_policy`), or when a step-wide choice (`Loss.selects`: Lp-Reg's paper-form
rho-percentile, 80/20, KL-Cov, Clip-Cov) spans several micro-batches or ranks. Otherwise the
update is on-policy in one micro-batch per rank and old_logp = None: the loss uses this pass's
own log-probs (ratio exactly 1), no extra forward.
The paper form split over micro-batches keeps the pass: its rho-percentile needs every
token's log-prob before any token's gradient, and recovering them during the update instead
would mean re-running the forward (with grad) of each micro-batch that holds a selected token,
which at rho = 1% of tokens spread over all sequences is nearly all of them.
"""

import contextlib
import hashlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, cast

import numpy as np
import torch
from torch import Tensor

from lpreg import build_proxy, lpreg_token_stats
from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer import instruments
from lpreg.trainer.advantage import group_advantages
from lpreg.trainer.evaluate import evaluate
from lpreg.trainer.logging_utils import format_row
from lpreg.trainer.losses import LOSSES, StepTokens, loss_denominator, method_loss, summarise_loss_metrics
from lpreg.trainer.model import format_prompt
from lpreg.trainer.problem import Problem
from lpreg.trainer.rollout import RolloutBatch, generate_group, pack, rollout_seed
from lpreg.trainer.setup import warm_start_cache_dir


def problem_at(problems: list, position: int, seed: int) -> Problem:
    """The problem at a global data position: a fresh permutation of the problems per epoch."""
    epoch, i = divmod(position, len(problems))
    order = list(range(len(problems)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return problems[order[i]]


def gather_floats(acc, values: List[float]) -> List[float]:
    """A list of floats from every rank, concatenated in rank order (equal lengths per rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.gather(t).cpu().tolist() if acc.num_processes > 1 else t.cpu().tolist()


def gather_varlen(acc, t: Tensor) -> Tensor:
    """1-d tensors of different lengths from every rank, concatenated in rank order."""
    if acc.num_processes == 1:
        return t
    n = torch.tensor([t.numel()], device=acc.device)
    sizes = acc.gather(n).tolist()
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=acc.device)
    padded[: t.numel()] = t
    allp = acc.gather(padded).view(len(sizes), -1)
    return torch.cat([allp[r, : sizes[r]] for r in range(len(sizes))])


def reduce_sum(acc, x: float) -> float:
    """The sum over ranks of one number."""
    if acc.num_processes == 1:
        return float(x)
    return float(acc.reduce(torch.tensor(float(x), dtype=torch.float64, device=acc.device), reduction="sum"))


def full_params_for_generation(acc, model) -> contextlib.AbstractContextManager:
    """Under FSDP (v1) every rank generates with its own full copy of the parameters (gathered
    once per step, not written back); under DDP or a single process the module already is one."""
    # imported here: only this call needs accelerate's types, and torch.distributed.fsdp is a heavy
    # import that only an FSDP run reaches
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            return FSDP.summon_full_params(model, writeback=False, recurse=True)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """This rank's share of a step's samples, with rewards and advantages."""

    questions: List[str]  # one per sample
    answers: List[str]
    prompt_ids: List[List[int]]
    responses: List[List[int]]
    texts: List[str]
    scores: List[float]  # this rank's rewards
    all_scores: List[float]  # every rank's, in rank order
    seq_adv: Tensor  # (this rank's samples,) advantages
    adv_metrics: Dict[str, float]
    reward_info: Dict[str, int]
    seconds_generate: float
    seconds_reward: float


def rollout(run, step: int) -> Rollout:
    """Generate n samples for each of this rank's prompts, score them, and compute advantages on
    the global batch (so batch-std scaling sees every rank)."""
    cfg, acc = run.cfg, run.acc
    P, n, world = cfg.prompts_per_step, cfg.samples_per_prompt, acc.num_processes
    per_rank = P // world
    first = step * P + acc.process_index * per_rank  # global data position of this rank's first prompt
    mine = [problem_at(run.problems, first + i, cfg.seed) for i in range(per_rank)]
    t0 = time.perf_counter()
    prompt_ids, responses = [], []
    run.policy.eval()
    with full_params_for_generation(acc, run.model):
        for i, prob in enumerate(mine):
            ids = run.tok.encode(format_prompt(run.tok, prob.question), add_special_tokens=False)
            responses += generate_group(run.policy, ids, n, cfg, eos_ids=run.eos_ids, pad_id=run.pad_id,
                                        seed=rollout_seed(cfg.seed, step, first + i))
            prompt_ids += [ids] * n
    run.policy.train()
    t1 = time.perf_counter()
    texts = run.tok.batch_decode(responses, skip_special_tokens=True)
    answers = [p.answer for p in mine for _ in range(n)]
    scores, info = run.reward_worker.score(texts, answers)
    all_scores = gather_floats(acc, scores)
    all_adv, adv_metrics = group_advantages(all_scores, n, std_scaling=cfg.std_scaling, eps=cfg.adv_eps)
    rank = acc.process_index
    return Rollout(
        questions=[p.question for p in mine for _ in range(n)], answers=answers, prompt_ids=prompt_ids,
        responses=responses, texts=texts, scores=scores, all_scores=all_scores,
        seq_adv=all_adv[rank * per_rank * n:(rank + 1) * per_rank * n], adv_metrics=adv_metrics,
        reward_info=info, seconds_generate=t1 - t0, seconds_reward=time.perf_counter() - t1,
    )


# ----------------------------------------------------------------------------- scoring pass


@dataclass
class StepPlan:
    """What the update needs, per micro-batch j (flattened over mini-batches, in order)."""

    batch: RolloutBatch
    tok_adv: Tensor  # (B, T): A on each response token
    micro: List[List[Tensor]]  # row indices: micro[mini][k]
    old_logp: List[Optional[Tensor]]  # None: on-policy, this pass's own log-probs
    proxies: list  # lpreg.SparseProxy of the rollout policy, or None (on-policy q)
    # the step-wide choice (`Loss.choose`): (B, T) bool token choice, lpreg.SelectionThreshold, or None
    choices: list
    denominators: List[float]  # per mini-batch, all ranks (losses.loss_denominator)
    n_tokens: int  # valid tokens of the step, all ranks
    off_policy: bool  # several updates per rollout: later ones need the rollout policy's log-probs (and q)
    scored: bool  # whether the no-grad scoring pass ran


@torch.no_grad()
def _score(run, batch: RolloutBatch, flat: List[Tensor], off_policy: bool = True):
    """The no-grad pass: per micro-batch old log-probs, entropies and (off-policy Lp-Reg) the
    rollout policy's sparse proxy, built from the same logits (no further forward). off_policy:
    `StepPlan.off_policy` (the default builds everything an off-policy step needs)."""
    cfg = run.cfg
    old_logp, ents, proxies = [], [], []
    for mb in flat:
        b = batch.slice(mb)
        logits = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits[:, :-1]
        st = lpreg_token_stats(logits, b.labels, temperature=cfg.temperature, backend=cfg.token_stats_backend)
        old_logp.append(st.logp)
        ents.append(st.entropy)
        proxies.append(build_proxy(logits, labels=b.labels, temperature=cfg.temperature, mode=cfg.lpreg_mode,
                                   threshold=cfg.lpreg_threshold, k=cfg.lpreg_proxy_k)
                       if off_policy and cfg.loss == "lpreg" else None)
    return old_logp, ents, proxies


def _step_tokens(run, step: int, plan: StepPlan, flat: List[Tensor], ents: List[Tensor]) -> StepTokens:
    """This rank's per-token statistics for a step-wide choice, and how to see every rank's."""
    acc = run.acc
    masks = [plan.batch.loss_mask[mb] for mb in flat]
    counts = gather_floats(acc, [float(sum(int((m > 0).sum()) for m in masks))])
    old_logp = cast(List[Tensor], plan.old_logp)  # called after the scoring pass, which sets every entry
    return StepTokens(old_logp=old_logp, entropy=ents, adv=[plan.tok_adv[mb] for mb in flat], masks=masks,
                      gather=lambda t: gather_varlen(acc, t), offset=int(sum(counts[: acc.process_index])),
                      generator=torch.Generator().manual_seed(rollout_seed(run.cfg.seed, step, -1)))


def scoring_pass(run, ro: Rollout, step: int) -> StepPlan:
    """Pack the step, split it into mini- and micro-batches and, when needed (module docstring),
    run the no-grad scoring pass; then each mini-batch's loss denominator."""
    cfg, acc = run.cfg, run.acc
    batch = pack(ro.prompt_ids, ro.responses, run.pad_id).to(acc.device)
    rows = torch.arange(batch.input_ids.shape[0])
    micro = [[m[j:j + cfg.micro_batch_size] for j in range(0, len(m), cfg.micro_batch_size)]
             for m in rows.chunk(cfg.mini_batches)]
    flat = [mb for mini in micro for mb in mini]
    none = [None] * len(flat)
    spec, off_policy = LOSSES[cfg.loss], cfg.mini_batches > 1
    step_wide = spec.selects(cfg) and (len(flat) > 1 or acc.num_processes > 1)
    plan = StepPlan(batch=batch, tok_adv=ro.seq_adv.to(acc.device)[:, None] * batch.loss_mask, micro=micro,
                    old_logp=list(none), proxies=list(none), choices=list(none), denominators=[],
                    n_tokens=int(reduce_sum(acc, float(batch.loss_mask.sum()))), off_policy=off_policy,
                    scored=off_policy or step_wide)
    if plan.scored:
        plan.old_logp, ents, plan.proxies = _score(run, batch, flat, off_policy)
        if spec.selects(cfg):
            plan.choices = spec.choose(_step_tokens(run, step, plan, flat, ents), cfg)
    j = 0
    for mini in micro:
        part = loss_denominator(cfg, [batch.loss_mask[mb] for mb in mini], plan.choices[j:j + len(mini)],
                                plan.n_tokens)
        plan.denominators.append(reduce_sum(acc, part))
        j += len(mini)
    return plan


# ---------------------------------------------------------------------------------- update


def update(run, plan: StepPlan, step: int) -> tuple[dict, list]:
    """One optimizer step per mini-batch; gradient accumulation over its micro-batches. Returns
    (metric sums over the step, gradient norms)."""
    cfg, acc, model = run.cfg, run.acc, run.model
    sums: Dict[str, Tensor] = {}
    grad_norms, j = [], 0
    for mini, denom in zip(plan.micro, plan.denominators):
        for k, mb in enumerate(mini):
            b = plan.batch.slice(mb)
            with contextlib.nullcontext() if k == len(mini) - 1 else acc.no_sync(model):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                loss, mb_sums = method_loss(
                    cfg.loss, logits[:, :-1], b.labels, plan.tok_adv[mb], plan.old_logp[j], b.loss_mask, cfg,
                    selected=plan.choices[j], proxy=plan.proxies[j], denominator=max(denom, 1.0))
                # this micro-batch's share of the mini-batch loss (all ranks' denominator); DDP
                # averages gradients over ranks, so times world
                acc.backward(loss * acc.num_processes)
            # logged pg_loss: the mean over mini-batches of the loss each optimizer step took
            mb_sums["actor/pg_loss"] = mb_sums["actor/pg_loss"] * (plan.n_tokens / len(plan.micro))
            for key, v in mb_sums.items():
                sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
            j += 1
        if step == run.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        grad_norms.append(float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return sums, grad_norms


# ----------------------------------------------------------------------------- logs, checkpoint


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
        **instruments.step_metrics(run, ro),  # e.g. lpreg.experiments.diversity's, when registered
        **{f"timing/{k}_s": v for k, v in timing.items()},
    }


def start_eval(run) -> None:
    """With --eval-start, the held-out evaluation of the policy before the first step, written as
    the step-0 row of metrics.jsonl (a fresh run only: a resumed one has it already). With
    --eval-start-cache it is read from, or written to, that cache (`eval_start_cache_file`)."""
    if not run.cfg.eval_start or run.start_step > 0:
        return
    path = eval_start_cache_file(run.cfg)
    if path is not None and os.path.isfile(path):
        with open(path) as fh:
            row = json.load(fh)
        run.bar.write(f"held-out evaluation at step 0: loaded {path}")
    else:
        row = {"step": 0, **held_out_eval(run, -1)}
        if path is not None and run.acc.is_main_process:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                json.dump(row, fh)
            os.replace(tmp, path)  # atomic: a concurrent run of the same seed writes the same row
    if run.acc.is_main_process:
        run.metrics_log.write(row)
        run.bar.write(format_row(row, keys=sorted(k for k in row if k.startswith("eval/"))))


def eval_start_cache_file(cfg) -> Optional[str]:
    """The --eval-start-cache file of this run's step-0 evaluation: a hash of the warm-start cache
    entry (which identifies the starting weights) and of every setting the evaluation depends on;
    None when either cache is unset."""
    ws = warm_start_cache_dir(cfg) if cfg.eval_start_cache else None
    if ws is None:
        return None
    keys = ("seed", "eval_problems", "eval_k", "eval_data", "temperature", "max_new_tokens", "micro_batch_size",
            "dtype", "torch_threads")
    key = json.dumps({"warm_start": os.path.basename(ws), **{k: getattr(cfg, k) for k in keys}}, sort_keys=True)
    return os.path.join(cfg.eval_start_cache, hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def held_out_eval(run, step: int) -> Dict[str, float]:
    """avg@k, pass@1..k and maj@k on the held-out problems every `eval_every` steps, at the last
    step and, as step -1, before the first (main process; the others wait). Sampling at the
    rollout temperature, under a forked RNG seeded by (seed, step), so training's random streams
    are untouched."""
    cfg, acc = run.cfg, run.acc
    if not cfg.eval_every or not ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        return {}
    out = {}
    with full_params_for_generation(acc, run.model):
        if acc.is_main_process:
            m = evaluate(run.policy, run.tok, run.eval_problems, k=cfg.eval_k, temperature=cfg.temperature,
                         greedy=False, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.micro_batch_size,
                         seed=rollout_seed(cfg.seed, step, -2), reward_worker=run.reward_worker)
            out = {f"eval/{k}": v for k, v in m.items() if "@" in k}
    acc.wait_for_everyone()
    return out


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
