"""Evaluate a policy on a problem set: avg@k, unbiased pass@k and maj@k.

    lpreg-eval --model runs/sft --data builtin --k 8 --temperature 1.0 --output eval.json
    python -m lpreg.trainer.evaluate --model runs/sft --data gsm8k_test.jsonl --greedy --max-new-tokens 512
    lpreg-eval --checkpoint runs/lpreg/checkpoints/step_000060      # that run's own held-out evaluation

`--model` loads the policy with the output transform its config records (a checkpoint is the policy:
lpreg.trainer.output_transform). `--checkpoint` reads a training checkpoint's config and repeats the
trainer's held-out evaluation at that step exactly: the same held-out problems (the task's test split,
or --eval-data), k, temperature, max new tokens, batch size and seed (`held_out_seed`). A study task
is registered by importing its module: `--register lpreg.experiments`.
Rows of a --data file that cannot be used are reported (line and reason; all of them with --output),
and past --max-skipped-frac (default 1%) of the rows the command stops before evaluating.

For each problem, `n` completions are generated (n = k when sampling; n = 1 with
--greedy, since greedy samples are identical) and scored 1/0 by `RewardWorker`
(math-verify in a worker process). With c correct out of n:

  - avg@n:  mean reward over all samples;
  - pass@j: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, j) / C(n, j),
            averaged over problems, for j = 1, 2, 4, ... <= n;
  - maj@n:  the majority answer (extracted as by the reward; samples without an answer
            do not vote; ties go to the answer seen first) is scored, i.e. the reward of
            a sample that gave that answer.

Generation uses a fresh GenerationConfig: do_sample, temperature T, top_p = 1.0, top_k = 0,
every eos id of tokenizer and model, left padding (see `lpreg.trainer.model`), so the
checkpoint's own generation_config (its top-p, repetition penalty...) cannot leak in.
The trainer calls `evaluate` on held-out problems every `--eval-every` steps (0 = never) and
logs the results as `eval/avg@k`, `eval/pass@j`, `eval/maj@k` (see `lpreg.trainer.step`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections import Counter

import torch

from lpreg.trainer.data import load_problem_file
from lpreg.trainer.model import format_prompt, generate_completions, load_policy
from lpreg.trainer.reward import RewardWorker, extract_answer
from lpreg.trainer.rollout import rollout_seed
from lpreg.trainer.tasks import arithmetic_problems, split_size

BUILTIN = "builtin"


def held_out_seed(seed: int, step: int) -> int:
    """The sampling seed of the trainer's held-out evaluation after 0-based `step` (-1: before the first)."""
    return rollout_seed(seed, step, -2)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Exact (integer binomials, one correctly rounded division). Raises ValueError unless
    0 <= c <= n and 1 <= k <= n.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise ValueError(f"n, c, k must be ints, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(completions: list[str], rewards: list[float], *, number_fallback: bool = True) -> float:
    """maj@n for one problem: the reward of the most common extracted answer (0 if none).

    Answers are extracted as the reward does (`number_fallback` as in `RewardWorker`)."""
    votes: Counter[str] = Counter()
    reward_of: dict[str, float] = {}
    for text, reward in zip(completions, rewards):
        answer = extract_answer(text, number_fallback=number_fallback)
        if answer is None:
            continue
        # Whitespace runs collapse ("1  + x" and "1 + x" are one vote), but answers are not
        # grouped by mathematical equivalence ("1+x" is another vote): that would cost a
        # math-verify call per pair of distinct answers.
        key = " ".join(answer.split())
        votes[key] += 1
        reward_of.setdefault(key, reward)
    if not votes:
        return 0.0
    # most_common is stable, so among tied answers the first one seen wins.
    return reward_of[votes.most_common(1)[0][0]]


def evaluate(model, tokenizer, problems, *, k: int, temperature: float, greedy: bool,
             max_new_tokens: int, batch_size: int, seed: int, reward_worker=None,
             timeout_s: float = 5.0, return_records: bool = False) -> dict:
    """Generate, score and summarise; returns a flat dict of floats (plus "records").

    Keys: "avg@n", "pass@j" for j = 1, 2, 4, ... <= n, "maj@n", "n_problems",
    "n_samples" (= n), "timeouts", "parse_failures", "mean_response_chars", "seconds".
    Pass a live `reward_worker` to reuse one across calls; otherwise one is started and
    closed here. With `return_records`, "records" lists per problem the question, gold
    answer, completions and rewards.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not problems:
        raise ValueError("problems must not be empty")
    start = time.perf_counter()
    n = 1 if greedy else k
    prompts = [format_prompt(tokenizer, p.question) for p in problems]
    answers = [p.answer for p in problems for _ in range(n)]
    owned = reward_worker is None
    # Started before generating, so that its interpreter start and math-verify import
    # overlap with generation.
    worker = RewardWorker(timeout_s=timeout_s) if owned else reward_worker
    try:
        completions = generate_completions(
            model, tokenizer, prompts, num_samples=n, greedy=greedy, temperature=temperature,
            max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
        )
        flat = [c for group in completions for c in group]
        flat_rewards, stats = worker.score(flat, answers)
    finally:
        if owned:
            worker.close()
    rewards = [flat_rewards[i * n : (i + 1) * n] for i in range(len(problems))]
    correct = [int(sum(r)) for r in rewards]
    metrics = {f"avg@{n}": sum(flat_rewards) / len(flat_rewards)}
    j = 1
    while j <= n:
        metrics[f"pass@{j}"] = sum(pass_at_k(n, c, j) for c in correct) / len(problems)
        j *= 2
    vote = [majority_correct(c, r, number_fallback=worker.number_fallback) for c, r in zip(completions, rewards)]
    metrics[f"maj@{n}"] = sum(vote) / len(problems)
    metrics.update(
        n_problems=len(problems),
        n_samples=n,
        timeouts=stats["timeouts"],
        parse_failures=stats["parse_failures"],
        mean_response_chars=sum(len(c) for c in flat) / len(flat),
        seconds=time.perf_counter() - start,
    )
    if return_records:
        metrics["records"] = [
            {"question": p.question, "answer": p.answer, "completions": c, "rewards": r}
            for p, c, r in zip(problems, completions, rewards)
        ]
    return metrics


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lpreg-eval", description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local Hugging Face model directory")
    source.add_argument("--checkpoint", help="a training checkpoint (step_NNNNNN/): repeat its run's held-out "
                                             "evaluation at that step exactly")
    ap.add_argument("--register", action="append", default=[], metavar="MODULE",
                    help="import MODULE first: it registers a task or output transform (e.g. lpreg.experiments)")
    ap.add_argument("--data", default=BUILTIN, help="a .jsonl/.parquet file, or 'builtin' (arithmetic test split)")
    ap.add_argument("--n-problems", type=int, default=None,
                    help="evaluate on this many problems (builtin default 500; files: first N)")
    ap.add_argument("--k", type=int, default=8, help="samples per problem when sampling")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (one sample per problem)")
    mode.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default 16 for builtin, 1024 for files")
    ap.add_argument("--batch-size", type=int, default=64, help="sequences generated per forward batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="math-verify timeout per sample, seconds")
    ap.add_argument("--max-skipped-frac", type=float, default=0.01,
                    help="the largest share of unusable --data rows accepted (default 0.01)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--output", default=None, help="write metrics, settings, per-problem records and skipped "
                                                   "rows as JSON")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"--k must be >= 1, got {args.k}")
    if not args.greedy and not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0.0 <= args.max_skipped_frac <= 1.0:
        ap.error(f"--max-skipped-frac must be in [0, 1], got {args.max_skipped_frac}")
    return args


def _checkpoint_settings(args, device: str, dtype: torch.dtype) -> dict:
    """What the trainer's held-out evaluation at a checkpoint's step used: its policy, problems, k,
    temperature, max new tokens, batch size and seed."""
    # imported here: only --checkpoint needs the trainer's set-up and checkpoint code
    from lpreg.trainer import checkpoint as ckpt
    from lpreg.trainer.config import TrainConfig
    from lpreg.trainer.setup import load_eval_problems

    path = ckpt.resolve_resume(args.checkpoint, os.path.dirname(args.checkpoint))
    assert path is not None  # resolve_resume raises for anything but a complete checkpoint
    model_dir, state = ckpt.load_checkpoint(path)
    known = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    if not cfg.eval_every:
        cfg.eval_every = 1  # the held-out problems are the same whatever the schedule
    problems, files = load_eval_problems(cfg)
    model, tokenizer = load_policy(model_dir, dtype=dtype, device=device)
    return dict(model=model, tokenizer=tokenizer, problems=problems, k=cfg.eval_k, temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.micro_batch_size,
                seed=held_out_seed(cfg.seed, int(state["step"]) - 1), files=files, step=int(state["step"]))


def run(argv=None) -> dict:
    """The command's work: parse `argv`, evaluate, print and optionally save; returns metrics."""
    args = _parse_args(argv)
    for module in args.register:
        importlib.import_module(module)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if args.checkpoint is not None:
        got = _checkpoint_settings(args, device, dtype)
        model, tokenizer, problems, files = got["model"], got["tokenizer"], got["problems"], got["files"]
        settings = {k: got[k] for k in ("k", "temperature", "max_new_tokens", "batch_size", "seed", "step")}
        greedy = False
    else:
        files = []
        if args.data == BUILTIN:
            n = args.n_problems if args.n_problems is not None else 500
            problems = arithmetic_problems(min(n, split_size("test")), seed=args.seed, split="test")
        else:
            data = load_problem_file(args.data, flag="--data")
            files = [data]
            problems = data.problems[: args.n_problems] if args.n_problems is not None else data.problems
        settings = {"k": args.k, "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size,
                    "max_new_tokens": args.max_new_tokens or (16 if args.data == BUILTIN else 1024)}
        greedy = args.greedy
        model, tokenizer = load_policy(args.model, dtype=dtype, device=device)
    for f in files:
        for line in f.log_lines():
            print(f"lpreg-eval: {line}", file=sys.stderr)
        f.check(args.max_skipped_frac)
    metrics = evaluate(
        model, tokenizer, problems, k=settings["k"], temperature=settings["temperature"], greedy=greedy,
        max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"], seed=settings["seed"],
        timeout_s=args.timeout, return_records=args.output is not None,
    )
    records = metrics.pop("records", None)
    skipped = [{"file": f.path, r.unit: r.line, "reason": r.reason} for f in files for r in f.skipped]
    metrics["skipped_rows"] = len(skipped)
    print(json.dumps(metrics, indent=2))
    if args.output:
        settings = {**vars(args), **settings, "device": device, "dtype": str(dtype)}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "metrics": metrics, "records": records, "skipped": skipped}, f,
                      indent=1)
    return metrics


def main(argv=None) -> int:
    """Console entry point `lpreg-eval`: exits with a one-line error for bad input (returns 0)."""
    try:
        run(argv)
    except ValueError as err:
        raise SystemExit(f"lpreg-eval: error: {err}") from err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
