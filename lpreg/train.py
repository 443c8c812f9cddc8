"""lpreg-train: a compact on-policy RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines).

Algorithm (one step; everything below happens in `train`, top to bottom):

    rollout    P prompts (global, all ranks) x n samples, HF `generate` at temperature T,
               top_p 1, top_k 0; each prompt's group seeded by (seed, step, prompt index)
    reward     math-verify against the gold answer, in a killable worker (1 / 0)
    advantage  A = (R - mean_group) / (std_group + eps)  (or batch std, or none)
    update     one optimizer step on the whole rollout (on-policy): token-mean of the chosen
               policy loss over every valid token of the step, exact across micro-batches
               and ranks; grad clip 1.0; AdamW
    log        metrics.jsonl (verl names), samples.jsonl, progress bar; PNG plots at the end
    checkpoint atomic, every `save_every` steps; `--resume auto` continues exactly

Lp-Reg (SPEC section 3, paper form by default): loss_t = -min(r A, clip(r, 0, 10) A)
+ beta * S_t * D_KL(q || p), S_t = [A < 0] & [p_y among the lowest rho of the step's tokens]
& [y survives the min-p filter]. The proxy q is built from the current logits, detached.

Where this departs from the paper:
- The policy is whatever `--model` gives; the embedded default is a tiny character-level model
  warmed up by SFT on integer arithmetic (operands <= 19), so RL has a non-zero reward on a CPU
  in minutes. Its RL problem set is small (64 problems, each seen every 4 steps): a model this
  size barely generalises across problems, so reward rises by learning the problems it meets.
- On-policy, `old_logp` is this pass's own logp (detached; the ratio is exactly 1), so no extra
  forward runs. Only when a step is split into several micro-batches or ranks AND the loss
  needs a step-wide token choice (Lp-Reg's rho-percentile, 80/20, KL-Cov, Clip-Cov), or with
  `--mini-batches > 1`, does a no-grad scoring pass run first to fix that choice (and the old
  log-probs) for the whole step.
- Rollouts are generated one prompt group per `generate` call, so that samples do not depend on
  how prompts are sharded across ranks (a 2-rank run equals a 1-rank run at the same batch).

Run:
    lpreg-train --preset cpu-tiny                       # the CPU demo, < 10 min on 2 cores
    lpreg-train --preset cpu-tiny --loss grpo --output-dir runs/grpo
    lpreg-train --preset qwen2.5-math-1.5b --model /models/Qwen2.5-Math-1.5B --data train.parquet
    accelerate launch --num_processes 8 -m lpreg.train --preset ...   # GPUs: DDP (or FSDP via config)
    torchrun --nproc_per_node 2 -m lpreg.train --preset test-micro     # CPU processes (gloo)
Flags mirror the fields of `lpreg.trainer.config.TrainConfig`; `--config FILE.yaml` sets many.
"""

import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch

from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer.advantage import group_advantages
from lpreg.trainer.config import load_config
from lpreg.trainer.logging_utils import (
    MetricsLog, format_row, plot_metrics, progress_bar, read_metrics, truncate_jsonl,
)
from lpreg.trainer.losses import NEEDS_SELECTION, finish_metrics, policy_loss, scatter_selection, select_tokens
from lpreg.trainer.rollout import eos_ids_of, generate_group, pack, rollout_seed

# Test hook: SIGKILL this process in the middle of that step (after the backward, before the
# optimizer step), to test that a crashed run resumes exactly.
KILL_ENV = "LPREG_TEST_KILL_AT_STEP"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_policy(cfg, device):
    """(model, tokenizer) from --model, or the embedded tiny model and character tokenizer."""
    from lpreg.trainer.model import build_tiny_model, load_policy
    from lpreg.trainer.tokenizer import build_char_tokenizer

    if cfg.model is None:
        tok = build_char_tokenizer()
        model = build_tiny_model(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, seed=cfg.seed, dtype=DTYPES[cfg.dtype], device=device)
        return model, tok
    if not os.path.isdir(cfg.model):
        raise ValueError(f"--model must be a local Hugging Face model directory; {cfg.model!r} does not exist")
    return load_policy(cfg.model, dtype=DTYPES[cfg.dtype], device=device)


def _small(problem, max_operand):
    # built-in questions read "a+b=?" / "a-b=?"
    a, b = re.findall(r"\d+", problem.question)[:2]
    return int(a) <= max_operand and int(b) <= max_operand


def builtin_problems(n, seed, split, max_operand):
    """`n` problems of the built-in task's split (fewer if the operand filter leaves fewer)."""
    from lpreg.trainer.tasks import arithmetic_problems, split_size

    pool = arithmetic_problems(split_size(split), seed, split)
    return [p for p in pool if _small(p, max_operand)][:n]


def load_task(cfg):
    """(RL problems, warm-start problems, rows skipped) from --data or the built-in task.

    Built-in: the warm start sees the whole (operand-filtered) training split; RL uses its first
    `n_problems`, a set small enough that each problem recurs during a short CPU run."""
    if cfg.data is None:
        pool = builtin_problems(10**9, cfg.seed, "train", cfg.max_operand)
        return pool[: cfg.n_problems], pool, 0
    from lpreg.trainer.data import load_problems

    if not os.path.isfile(cfg.data):
        raise ValueError(f"--data must be a .jsonl or .parquet file; {cfg.data!r} does not exist")
    try:
        problems, skipped = load_problems(cfg.data)
    except ValueError as err:
        raise ValueError(f"--data {cfg.data!r}: {err}") from err
    if not problems:
        raise ValueError(f"--data {cfg.data!r} has no usable rows ({skipped} rows skipped)")
    return problems, problems, skipped


def load_weights(model, model_dir):
    """Load a checkpoint's weights (one safetensors file or an indexed set of shards) into the
    already-built model, which keeps its tokenizer and config."""
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    weights = {}
    for shard in shards:
        weights.update(load_file(os.path.join(model_dir, shard)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if "lm_head" in k and model.config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise ValueError(f"checkpoint {model_dir!r} does not match the model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()


def problem_at(problems, position, seed):
    """The problem at a global data position: a fresh permutation of the problems per epoch."""
    epoch, i = divmod(position, len(problems))
    order = list(range(len(problems)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return problems[order[i]]


def gather_floats(acc, values):
    """A list of floats from every rank, concatenated in rank order (equal lengths per rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.gather(t).cpu().tolist() if acc.num_processes > 1 else t.cpu().tolist()


def gather_varlen(acc, t):
    """1-d tensors of different lengths from every rank, concatenated in rank order."""
    if acc.num_processes == 1:
        return t
    n = torch.tensor([t.numel()], device=acc.device)
    sizes = acc.gather(n).tolist()
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=acc.device)
    padded[: t.numel()] = t
    allp = acc.gather(padded).view(len(sizes), -1)
    return torch.cat([allp[r, : sizes[r]] for r in range(len(sizes))])


def full_params_for_generation(acc, model):
    """Under FSDP (v1) every rank generates with its own full copy of the parameters (gathered
    once per step, not written back); under DDP or a single process the module already is one."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            return FSDP.summon_full_params(model, writeback=False, recurse=True)
    return contextlib.nullcontext()


def train(cfg):
    """Run the whole job described by `cfg`; returns the trained (unwrapped) policy."""
    from accelerate import Accelerator

    from lpreg.selection import selection_threshold
    from lpreg.trainer.model import format_prompt, warm_start
    from lpreg.trainer.reward import RewardWorker

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-checkpoint bar would drown the log
    # cpu=True without CUDA: accelerate only sets up a multi-process CPU (gloo) run when told
    acc = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = acc.num_processes, acc.process_index
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step ({cfg.prompts_per_step}) must be divisible by the {world} processes")
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    log = acc.print

    # --- set-up: policy, task, warm start or resume -------------------------------------------
    problems, warm_problems, n_skipped = load_task(cfg)
    model, tok = build_policy(cfg, acc.device)
    log(f"lpreg-train: {len(problems)} RL problems ({n_skipped} rows skipped), loss={cfg.loss}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} process(es)")
    resume_dir = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
    state = None
    if resume_dir is not None:
        model_dir, state = ckpt.load_checkpoint(resume_dir)
        load_weights(model, model_dir)
        log(f"resumed from {resume_dir} (step {state['step']})")
    elif cfg.warmup_steps > 0:
        n_eval = cfg.warmup_eval_problems
        held_out = builtin_problems(n_eval, cfg.seed + 1, "test", cfg.max_operand) if cfg.data is None \
            else None
        ws = warm_start(model, tok, warm_problems, steps=cfg.warmup_steps, lr=cfg.warmup_lr,
                        batch_size=cfg.warmup_batch_size, seed=cfg.seed, log=log, eval_problems=held_out)
        if acc.is_main_process:
            with open(os.path.join(cfg.output_dir, "warm_start.json"), "w") as fh:
                json.dump(ws, fh)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    # not prepared: accelerate would step a prepared scheduler once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    )
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        ckpt.restore_rng(state["rng"])
    policy = acc.unwrap_model(model)
    eos_ids = eos_ids_of(policy, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    metrics_log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"), resume_step=start_step if state else None) \
        if acc.is_main_process else None
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")
    if acc.is_main_process and state is None and os.path.exists(samples_path):
        os.remove(samples_path)
    elif acc.is_main_process and state is not None:
        truncate_jsonl(samples_path, start_step)
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    P, n = cfg.prompts_per_step, cfg.samples_per_prompt
    per_rank = P // world
    bar = progress_bar(cfg.steps, start_step, cfg.progress and acc.is_main_process)
    reward_worker = RewardWorker(timeout_s=cfg.reward_timeout_s)  # closed in the finally below

    try:
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            # --- rollout: this rank's prompts, n samples each --------------------------------------
            first = step * P + rank * per_rank  # global data position of this rank's first prompt
            mine = [problem_at(problems, first + i, cfg.seed) for i in range(per_rank)]
            prompt_ids, responses, answers = [], [], []
            policy.eval()
            with full_params_for_generation(acc, model):
                for i, prob in enumerate(mine):
                    ids = tok.encode(format_prompt(tok, prob.question), add_special_tokens=False)
                    group = generate_group(policy, ids, n, cfg, eos_ids=eos_ids, pad_id=pad_id,
                                           seed=rollout_seed(cfg.seed, step, first + i))
                    prompt_ids += [ids] * n
                    responses += group
                    answers += [prob.answer] * n
            policy.train()
            t_rollout = time.perf_counter() - t_step

            # --- reward ----------------------------------------------------------------------------
            t0 = time.perf_counter()
            texts = tok.batch_decode(responses, skip_special_tokens=True)
            scores, info = reward_worker.score(texts, answers)
            t_reward = time.perf_counter() - t0

            # --- advantage (on the global batch, so batch-std scaling sees every rank) -------------
            all_scores = gather_floats(acc, scores)
            all_adv, adv_metrics = group_advantages(all_scores, n, std_scaling=cfg.std_scaling, eps=cfg.adv_eps)
            seq_adv = all_adv[rank * per_rank * n:(rank + 1) * per_rank * n]

            # --- update ----------------------------------------------------------------------------
            t0 = time.perf_counter()
            batch = pack(prompt_ids, responses, pad_id).to(acc.device)
            tok_adv = seq_adv.to(acc.device)[:, None] * batch.loss_mask  # (B, T): A on each response token
            n_tokens = int(acc.reduce(batch.loss_mask.sum().to(acc.device), reduction="sum").item()) \
                if world > 1 else int(batch.loss_mask.sum().item())
            rows = torch.arange(batch.input_ids.shape[0])
            minis = list(rows.chunk(cfg.mini_batches))
            micro = [[m[j:j + cfg.micro_batch_size] for j in range(0, len(m), cfg.micro_batch_size)] for m in minis]
            flat_micro = [mb for mini in micro for mb in mini]
            needs_choice = cfg.loss in NEEDS_SELECTION or (cfg.loss == "lpreg" and cfg.lpreg_compat == "paper")
            scoring_pass = cfg.mini_batches > 1 or (needs_choice and (len(flat_micro) > 1 or world > 1))
            old_logp, chosen, thresholds = [None] * len(flat_micro), [None] * len(flat_micro), [None] * len(flat_micro)
            if scoring_pass:
                # One no-grad pass fixes the old log-probs and the step-wide token choice.
                from lpreg.token_stats import lpreg_token_stats

                ents = []
                with torch.no_grad():
                    for j, mb in enumerate(flat_micro):
                        b = batch.slice(mb)
                        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                        st = lpreg_token_stats(logits[:, :-1], b.labels, temperature=cfg.temperature,
                                               backend=cfg.token_stats_backend)
                        old_logp[j] = st.logp
                        ents.append(st.entropy)
                masks = [batch.loss_mask[mb] for mb in flat_micro]
                if cfg.loss == "lpreg" and cfg.lpreg_compat == "paper":
                    thresholds = selection_threshold(old_logp, masks, rho=cfg.lpreg_rho)
                elif cfg.loss in NEEDS_SELECTION:
                    def flat(ts):
                        return gather_varlen(acc, torch.cat([t[m > 0] for t, m in zip(ts, masks)]))

                    gen = torch.Generator().manual_seed(rollout_seed(cfg.seed, step, -1))
                    sel = select_tokens(cfg.loss, flat(old_logp).cpu(), flat(ents).cpu(),
                                        flat([tok_adv[mb] for mb in flat_micro]).cpu(), cfg, generator=gen)
                    counts = gather_floats(acc, [float(sum(int((m > 0).sum()) for m in masks))])
                    lo = int(sum(counts[:rank]))  # this rank's tokens in the gathered order
                    chosen = scatter_selection(sel[lo:lo + int(counts[rank])], masks)
                # old_logp stays this pass's values: Lp-Reg's threshold compares against exactly them
            sums, j = {}, 0
            grad_norms = []
            for mini in micro:
                mini_tokens = n_tokens if cfg.mini_batches == 1 else \
                    int(acc.reduce(batch.loss_mask[torch.cat(mini)].sum(), reduction="sum").item())
                for k, mb in enumerate(mini):
                    b = batch.slice(mb)
                    sync = contextlib.nullcontext() if k == len(mini) - 1 else acc.no_sync(model)
                    with sync:
                        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                        loss_sum, mb_sums = policy_loss(
                            cfg.loss, logits[:, :-1], b.labels, tok_adv[mb], old_logp[j], b.loss_mask, cfg,
                            selected=chosen[j], lpreg_threshold=thresholds[j])
                        # DDP averages gradients over ranks: scale by world / global tokens for a token-mean
                        acc.backward(loss_sum * (world / max(mini_tokens, 1)))
                    for key, v in mb_sums.items():
                        sums[key] = sums.get(key, 0.0) + v.detach().float().cpu()
                    j += 1
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                grad_norms.append(float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            t_update = time.perf_counter() - t0

            # --- log -------------------------------------------------------------------------------
            keys = sorted(sums)
            totals = torch.stack([sums[k_].reshape(()) for k_ in keys]).to(acc.device)
            if world > 1:
                totals = acc.reduce(totals, reduction="sum")
            metrics = finish_metrics(dict(zip(keys, totals.cpu().tolist())), n_tokens)
            lengths = gather_floats(acc, [float(len(r)) for r in responses])
            eos_set = set(eos_ids)
            clipped = gather_floats(acc, [float(not r or r[-1] not in eos_set) for r in responses])
            counts = gather_floats(acc, [float(info.get("timeouts", 0)), float(info.get("parse_failures", 0))])
            row = {
                "step": step + 1,
                "critic/score/mean": float(np.mean(all_scores)),
                "critic/score/max": float(np.max(all_scores)),
                "critic/score/min": float(np.min(all_scores)),
                **metrics,
                **adv_metrics,
                "actor/grad_norm": float(np.mean(grad_norms)),
                "actor/lr": scheduler.get_last_lr()[0],
                "response_length/mean": float(np.mean(lengths)),
                "response_length/max": float(np.max(lengths)),
                "response_length/clip_ratio": float(np.mean(clipped)),
                "reward/timeouts": int(sum(counts[0::2])),
                "reward/parse_failures": int(sum(counts[1::2])),
                "train/n_tokens": n_tokens,
                "train/scoring_pass": int(scoring_pass),
                "timing/rollout_s": t_rollout,
                "timing/reward_s": t_reward,
                "timing/update_s": t_update,
                "timing/step_s": time.perf_counter() - t_step,
            }
            if acc.is_main_process:
                metrics_log.write(row)
                bar.update(1)
                bar.set_postfix(reward=f"{row['critic/score/mean']:.3f}", H=f"{row['actor/entropy']:.3f}")
                if cfg.sample_every and ((step + 1) % cfg.sample_every == 0 or step == start_step):
                    with open(samples_path, "a") as fh:
                        for q, a, t, s in list(zip([p.question for p in mine for _ in range(n)], answers, texts,
                                                   scores))[: 2 * n]:
                            fh.write(json.dumps({"step": step + 1, "question": q, "answer": a,
                                                 "completion": t, "reward": s}) + "\n")
                    bar.write(format_row(row))

            # --- checkpoint ------------------------------------------------------------------------
            last = step + 1 == cfg.steps
            if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                state_dict = acc.get_state_dict(model)
                if acc.is_main_process:
                    ckpt.save_checkpoint(cfg.output_dir, step + 1, model=policy, tokenizer=tok, optimizer=optimizer,
                                         scheduler=scheduler, data_position=(step + 1) * P, config=cfg,
                                         keep=cfg.keep_checkpoints, state_dict=state_dict)
                acc.wait_for_everyone()
    finally:
        reward_worker.close()
        bar.close()
        if metrics_log is not None:
            metrics_log.close()

    if acc.is_main_process and cfg.plot:
        rows = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
        path = plot_metrics({cfg.loss: rows}, os.path.join(cfg.output_dir, "training_curves.png"),
                            title=f"{cfg.preset}, loss={cfg.loss}")
        log(f"plots: {path}")
    acc.wait_for_everyone()
    acc.end_training()
    return policy


def main(argv=None):
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
