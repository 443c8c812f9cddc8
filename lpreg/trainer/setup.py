"""The trainer's set-up: accelerator, policy, task, warm start or resume, optimizer, run files.

`setup(cfg)` returns a `Run`: everything the step's stages (lpreg.trainer.rollout, .scoring, .update,
.step) read (and the few things they update), so that `lpreg.trainer.loop.train` is a short loop over steps.

The policy's output transform (`--output-transform`, lpreg.trainer.output_transform) is installed when the
policy is built and recorded in its config, so every checkpoint and warm-start cache entry carries it; a
resumed or cached checkpoint must record the same one (or none, when the run names none: then the
checkpoint's is restored).
"""

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer import instruments, registry
from lpreg.trainer.data import SKIPPED_FILE, ProblemFile, load_problem_file
from lpreg.trainer.logging_utils import MetricsLog, progress_bar, truncate_jsonl
from lpreg.trainer.model import build_tiny_model, eos_token_ids, load_policy, warm_start
from lpreg.trainer.output_transform import CONFIG_KEY, apply_output_transform, saved_transform
from lpreg.trainer.problem import Problem
from lpreg.trainer.reward import RewardWorker
from lpreg.trainer.tasks import TASKS, WARM_START_AUGMENTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    """The state of one training job, shared by the step functions."""

    cfg: Any  # TrainConfig
    acc: Any  # accelerate.Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP / FSDP wrapper, or the module)
    policy: torch.nn.Module  # the unwrapped module: generation, checkpoints
    tok: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    problems: List[Problem]  # the RL problem set
    eval_problems: Optional[List[Problem]]  # held-out problems (None when eval_every is 0)
    start_step: int
    resumed: bool
    eos_ids: List[int]
    pad_id: int
    metrics_log: Optional[MetricsLog]  # main process only
    samples_path: str
    bar: Any
    reward_worker: Any

    def close(self) -> None:
        self.reward_worker.close()
        self.bar.close()
        if self.metrics_log is not None:
            self.metrics_log.close()


def build_policy(cfg, device) -> Tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from --model (with the output transform its config records), or the tiny model
    over the built-in task's tokenizer; then --output-transform, if set, installed and recorded."""
    if cfg.model is None:
        tok = _task(cfg).tokenizer()
        model = build_tiny_model(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, seed=cfg.seed, dtype=DTYPES[cfg.dtype], device=device)
    else:
        if not os.path.isdir(cfg.model):
            raise ValueError(f"--model must be a local Hugging Face model directory; {cfg.model!r} does not exist")
        model, tok = load_policy(cfg.model, dtype=DTYPES[cfg.dtype], device=device)
    if cfg.output_transform:
        apply_output_transform(model, cfg.output_transform)
    return model, tok


def _task(cfg):
    """The built-in task --task names (importing the module that registers it, when one is listed)."""
    if not registry.ensure("task", cfg.task, TASKS):
        raise ValueError(f"--task must be one of {tuple(sorted(TASKS))}, got {cfg.task!r}")
    return TASKS[cfg.task]


def builtin_problems(cfg, n: int, seed: int, split: str) -> List[Problem]:
    """The first `n` problems of the built-in task's split (fewer if the split holds fewer)."""
    return _task(cfg).split_problems(split, seed, cfg.max_operand)[:n]


def _problem_file(cfg, flag: str, path: str) -> ProblemFile:
    """--data / --eval-data, read (its skipped rows are reported and checked against --max-skipped-frac
    by `setup`, before any training)."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} must be a .jsonl or .parquet file; {path!r} does not exist")
    return load_problem_file(path, flag=flag)


def load_task(cfg) -> Tuple[List[Problem], List[Problem], List[ProblemFile]]:
    """(RL problems, warm-start problems, the problem files read) from --data or the built-in task.

    Built-in: the warm start sees the whole (operand-filtered) training split, plus the task's
    warm-start-only problems if it has any; RL uses the split's first `n_problems`, a set small
    enough that each problem recurs during a short CPU run."""
    if cfg.data is None:
        pool = builtin_problems(cfg, 10**9, cfg.seed, "train")
        extra = _task(cfg).warm_start_extra
        return pool[: cfg.n_problems], pool + (extra() if extra is not None else []), []
    data = _problem_file(cfg, "--data", cfg.data)
    return data.problems, data.problems, [data]


def load_eval_problems(cfg) -> Tuple[Optional[List[Problem]], List[ProblemFile]]:
    """(held-out problems for `--eval-every`: --eval-data, else the built-in task's test split; the
    problem files read)."""
    if cfg.eval_every == 0:
        return None, []
    if cfg.eval_data is not None:
        data = _problem_file(cfg, "--eval-data", cfg.eval_data)
        return data.problems[: cfg.eval_problems], [data]
    if cfg.data is not None:
        raise ValueError("--eval-every with --data needs --eval-data (held-out problems), got none")
    return builtin_problems(cfg, cfg.eval_problems, cfg.seed + 1, "test"), []


def load_weights(model: PreTrainedModel, model_dir: str) -> None:
    """Load a checkpoint's weights (one safetensors file or an indexed set of shards) into the
    already-built model, which keeps its tokenizer and config."""
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
        raise ValueError(f"checkpoint {model_dir!r} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    if tied:
        model.tie_weights()


def _accelerator(cfg):
    # imported here: accelerate (and through it torch.distributed) is a heavy import, and only a run
    # needs it, not the config, data, sweep and checkpoint code that import this module
    from accelerate import Accelerator

    hf_logging.disable_progress_bar()  # save_pretrained's per-checkpoint bar would drown the log
    # cpu=True without CUDA: accelerate only sets up a multi-process CPU (gloo) run when told
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if cfg.prompts_per_step % acc.num_processes:
        raise ValueError(f"--prompts-per-step ({cfg.prompts_per_step}) must be divisible by the "
                         f"{acc.num_processes} processes")
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    return acc


def run_warm_start(cfg, model, tok, warm_problems: List[Problem], log=print) -> dict:
    """The SFT warm start `cfg` asks for (no cache); held-out accuracy on the built-in task's
    test split, or on a slice of `warm_problems` with --data. Returns `model.warm_start`'s metrics."""
    held_out = builtin_problems(cfg, cfg.warmup_eval_problems, cfg.seed + 1, "test") if cfg.data is None else None
    augment = _warm_start_augment(cfg)
    return warm_start(model, tok, warm_problems, steps=cfg.warmup_steps, lr=cfg.warmup_lr,
                      batch_size=cfg.warmup_batch_size, seed=cfg.seed, log=log, eval_problems=held_out,
                      augment=augment.make(tok) if augment is not None else None)


def _warm_start_augment(cfg):
    """The built-in task's change of its warm-start targets (a WarmStartAugment; None without, and with
    --data)."""
    return WARM_START_AUGMENTS.get(cfg.task) if cfg.data is None else None


def load_checkpoint_weights(model: PreTrainedModel, model_dir: str, *, source: str) -> None:
    """`load_weights`, after checking that the checkpoint records the output transform the policy has:
    the same one, or one the run did not name (then it is installed: the checkpoint is the policy)."""
    with open(os.path.join(model_dir, "config.json")) as fh:
        saved = saved_transform(type("Saved", (), {CONFIG_KEY: json.load(fh).get(CONFIG_KEY)})())
    ours = saved_transform(model.config)
    if saved is not None and ours is None:
        spec = saved["name"] + (":" + ",".join(f"{k}={json.dumps(v)}" for k, v in saved["params"].items())
                                if saved["params"] else "")
        apply_output_transform(model, spec, source=source)
    elif (saved and (saved["name"], saved["params"])) != (ours and (ours["name"], ours["params"])):
        raise ValueError(f"{source} {model_dir!r} records the output transform {saved}, but this run's policy has "
                         f"{ours} (--output-transform): a checkpoint is the policy it was saved from")
    load_weights(model, model_dir)


def _resume_or_warm_start(cfg, acc, model, tok, warm_problems) -> Optional[dict]:
    """Load the checkpoint to resume from (returns its trainer state), or run the SFT warm start."""
    resume_dir = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
    if resume_dir is not None:
        model_dir, state = ckpt.load_checkpoint(resume_dir)
        load_checkpoint_weights(model, model_dir, source="--resume")
        acc.print(f"resumed from {resume_dir} (step {state['step']})")
        return state
    if cfg.warmup_steps > 0:
        cached = warm_start_cache_dir(cfg)
        if cached is not None and os.path.isfile(os.path.join(cached, "warm_start.json")):
            load_checkpoint_weights(model, cached, source="--warm-start-cache")
            with open(os.path.join(cached, "warm_start.json")) as fh:
                ws = {**json.load(fh), "cache": cached}
            acc.print(f"warm start: loaded {cached}")
        else:
            ws = run_warm_start(cfg, model, tok, warm_problems, log=acc.print)
            if cached is not None and acc.is_main_process:
                _save_warm_start(model, ws, cached)
        if acc.is_main_process:
            with open(os.path.join(cfg.output_dir, "warm_start.json"), "w") as fh:
                json.dump(ws, fh)
    return None


# every field the warm start's result depends on (the RL fields do not touch it)
WARM_START_KEYS = ("task", "data", "max_operand", "model", "dtype", "hidden_size", "num_layers", "num_heads", "seed",
                   "warmup_steps", "warmup_lr", "warmup_batch_size", "warmup_eval_problems")


def warm_start_cache_dir(cfg) -> Optional[str]:
    """`--warm-start-cache`'s entry for this config: a hash of WARM_START_KEYS, of the task's warm-start
    augment and of the warm-start problems' text, or None when unset (or when --data is a file)."""
    if not cfg.warm_start_cache or cfg.data is not None:
        return None
    # the warm-start data's text too, so that a changed task never loads a stale entry
    texts = "\n".join(f"{p.question}\t{p.target or p.answer}" for p in load_task(cfg)[1])
    augment = _warm_start_augment(cfg)
    extra = dict(augment.key) if augment is not None else {}
    if cfg.output_transform:
        extra["output_transform"] = cfg.output_transform
    key = json.dumps({**{k: getattr(cfg, k) for k in WARM_START_KEYS}, **extra,
                      "data": hashlib.sha256(texts.encode()).hexdigest()}, sort_keys=True)
    return os.path.join(cfg.warm_start_cache, hashlib.sha256(key.encode()).hexdigest()[:16])


def _save_warm_start(model: PreTrainedModel, ws: dict, path: str) -> None:
    """Write the warm-started weights atomically (another run may be writing the same entry:
    whichever renames first wins, and the entries are identical)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".tmp-")
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "warm_start.json"), "w") as fh:
        json.dump(ws, fh)
    try:
        os.rename(tmp, path)
    except OSError:  # the entry appeared meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def _optimizer(cfg, acc, model, state):
    """AdamW + a linear lr warm-up, prepared by accelerate; restored from `state` on resume."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    # not prepared: accelerate would step a prepared scheduler once per process
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
    return model, optimizer, scheduler


def _run_files(cfg, acc, start_step: int, resumed: bool) -> Tuple[Optional[MetricsLog], str]:
    """metrics.jsonl, samples.jsonl, held_out.jsonl and the instruments' own logs: each truncated to the
    checkpoint's step on resume, and started afresh otherwise. Returns (metrics log, samples.jsonl's path)."""
    metrics_log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl"),
                             resume_step=start_step if resumed else None) if acc.is_main_process else None
    paths = [os.path.join(cfg.output_dir, name) for name in ("samples.jsonl", "held_out.jsonl",
                                                            *instruments.log_files())]
    for path in paths:
        if acc.is_main_process and not resumed and os.path.exists(path):
            os.remove(path)
        elif acc.is_main_process and resumed:
            truncate_jsonl(path, start_step)
    return metrics_log, paths[0]


def setup(cfg) -> Run:
    """Everything before the first step: policy, task, warm start or resume, optimizer, files."""
    acc = _accelerator(cfg)
    problems, warm_problems, files = load_task(cfg)
    eval_problems, eval_files = load_eval_problems(cfg)
    _report_skipped(acc, cfg, files + eval_files)
    for f in files + eval_files:
        f.check(cfg.max_skipped_frac)  # past it, the run stops here: nothing trained yet
    model, tok = build_policy(cfg, acc.device)
    acc.print(f"lpreg-train: {len(problems)} RL problems, loss={cfg.loss}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {acc.num_processes} process(es)")
    state = _resume_or_warm_start(cfg, acc, model, tok, warm_problems)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    model, optimizer, scheduler = _optimizer(cfg, acc, model, state)
    start_step = state["step"] if state is not None else 0
    policy = acc.unwrap_model(model)
    eos_ids = eos_token_ids(policy, tok)
    metrics_log, samples_path = _run_files(cfg, acc, start_step, state is not None)
    return Run(
        cfg=cfg, acc=acc, model=model, policy=policy, tok=tok, optimizer=optimizer, scheduler=scheduler,
        problems=problems, eval_problems=eval_problems, start_step=start_step, resumed=state is not None,
        eos_ids=eos_ids, pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0],
        metrics_log=metrics_log, samples_path=samples_path,
        bar=progress_bar(cfg.steps, start_step, cfg.progress and acc.is_main_process),
        reward_worker=RewardWorker(timeout_s=cfg.reward_timeout_s),  # closed by Run.close
    )


def _report_skipped(acc, cfg, files: List[ProblemFile]) -> None:
    """Every problem file's skipped rows: the first few in the log, all of them in the run directory's
    skipped_rows.jsonl (removed when no row was skipped)."""
    path = os.path.join(cfg.output_dir, SKIPPED_FILE)
    if not acc.is_main_process:
        return
    for f in files:
        for line in f.log_lines():
            acc.print(f"lpreg-train: {line}")
    if any(f.skipped for f in files):
        with open(path, "w") as fh:
            for f in files:
                f.write_skipped(fh)
        acc.print(f"lpreg-train: every skipped row is listed in {path}")
    elif os.path.exists(path):
        os.remove(path)
