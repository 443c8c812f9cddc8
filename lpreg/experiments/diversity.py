"""Per-step diversity metrics: the probability of a task's rare valuable ("spark") tokens and the
number of distinct answers per group. `step_metrics` is the trainer instrument (`lpreg.trainer.instruments`)
that `lpreg.experiments` registers: it adds these to every metrics.jsonl row.

    spark/prob     mean over the step's prompts of sum_{s in sparks} p(s | prompt) at the first
                   response position, p = softmax(z / T) of the current policy (after the update:
                   the policy the next rollout samples from)
    spark/usage    share of the step's samples whose first response token is a spark token
    train/distinct_answers   mean over groups of the number of distinct extracted answers
                   (`reward.extract_answer`; a sample with no answer counts as one more answer,
                   "none"); n means every sample of a group answered differently, 1 a collapsed group
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from lpreg.trainer.ranks import full_params_for_generation, gather_floats
from lpreg.trainer.reward import extract_answer
from lpreg.trainer.summary import format_number, mean_of

__all__ = ["SPARK_TOKENS", "register_spark_tokens", "spark_probability", "spark_usage", "distinct_answers",
           "step_metrics", "summary_lines"]

# built-in task name -> its rare valuable tokens (the study's tasks register theirs: lpreg.experiments)
SPARK_TOKENS: Dict[str, Tuple[str, ...]] = {}


def register_spark_tokens(task: str, tokens: Sequence[str]) -> None:
    """The spark tokens of the built-in task `task`, whose probability `step_metrics` logs."""
    SPARK_TOKENS[task] = tuple(tokens)


def step_metrics(run, ro) -> Dict[str, float]:
    """train/distinct_answers per group, and (a built-in task with spark tokens, the built-in
    policy) spark/prob and spark/usage. Every rank calls this (the trainer's `step_metrics` hook)."""
    cfg, acc, n = run.cfg, run.acc, run.cfg.samples_per_prompt
    out = {"train/distinct_answers": float(np.mean(gather_floats(acc, distinct_answers(ro.texts, n))))}
    sparks = SPARK_TOKENS.get(cfg.task, ()) if cfg.data is None else ()
    vocab = run.tok.get_vocab()
    spark_ids = [vocab[s] for s in sparks if s in vocab]
    if spark_ids:
        with full_params_for_generation(acc, run.model):
            probs = spark_probability(run.policy, ro.prompt_ids[::n], spark_ids, cfg.temperature)
        out["spark/prob"] = float(np.mean(gather_floats(acc, probs)))
        out["spark/usage"] = float(np.mean(gather_floats(acc, spark_usage(ro.responses, spark_ids))))
    return out


@torch.no_grad()
def spark_probability(policy: torch.nn.Module, prompts: Sequence[List[int]], spark_ids: Sequence[int],
                      temperature: float) -> List[float]:
    """sum over `spark_ids` of p(token | prompt) at the next position, one value per prompt.

    One forward per prompt (prompts differ in length; left padding would shift a Llama's
    positions), so the values do not depend on how prompts are batched."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    out = []
    try:
        for ids in prompts:
            x = torch.tensor([list(ids)], dtype=torch.long, device=device)
            z = policy(input_ids=x, use_cache=False).logits[0, -1].float() / temperature
            out.append(float(torch.softmax(z, -1)[list(spark_ids)].sum()))
    finally:
        policy.train(was_training)
    return out


def spark_usage(responses: Sequence[List[int]], spark_ids: Sequence[int]) -> List[float]:
    """1.0 for each response whose first token is a spark token, else 0.0."""
    ids = set(int(i) for i in spark_ids)
    return [float(bool(r) and int(r[0]) in ids) for r in responses]


def distinct_answers(texts: Sequence[str], group_size: int) -> List[float]:
    """The number of distinct extracted answers in each consecutive group of `group_size` texts."""
    if group_size < 1 or len(texts) % group_size:
        raise ValueError(f"group_size must be >= 1 and divide len(texts) ({len(texts)}), got {group_size}")
    out = []
    for g in range(0, len(texts), group_size):
        answers = {extract_answer(t) for t in texts[g:g + group_size]}
        out.append(float(len(answers)))
    return out


def summary_lines(rows: List[dict], window: int = 10) -> List[str]:
    """The end-of-run summary's p(spark) line: the mean of the first and of the last `window` steps (no
    line when the run logged no spark/prob)."""
    values = [r["spark/prob"] for r in rows if r.get("step", 0) >= 1 and "spark/prob" in r]
    if not values:
        return []
    return [f"  p(spark)             {format_number(mean_of(values[:window]), '.4f')} -> "
            f"{format_number(mean_of(values[-window:]), '.4f')}   (lpreg.experiments.diversity)"]
