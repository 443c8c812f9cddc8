"""Sampling as the trainer samples: G completions per prompt at temperature T, the trainer's reward,
GRPO group advantages.

Each prompt's group comes from `lpreg.trainer.rollout.generate_group` (top-p 1, top-k 0, the model's own
generation config kept out, cut after the first EOS, seeded per prompt), scored by the trainer's reward
(math-verify in a worker process, or exact match of the extracted answer), and centred within its group
(`lpreg.trainer.advantage.group_advantages`, std scaling by group as GRPO does).
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, List, Optional

import torch

from lpreg.trainer.advantage import group_advantages
from lpreg.trainer.model import eos_token_ids, format_prompt
from lpreg.trainer.problem import Problem
from lpreg.trainer.reward import RewardWorker, extract_answer
from lpreg.trainer.rollout import generate_group, rollout_seed


@dataclass
class Samples:
    """G samples per prompt, laid out prompt by prompt (sequence i belongs to prompt i // G)."""

    questions: List[str]  # one per sequence
    prompt_ids: List[List[int]]
    responses: List[List[int]]
    texts: List[str]
    rewards: List[float]
    advantages: torch.Tensor  # (n_sequences,) fp32
    group_size: int
    pad_id: int

    @property
    def frac_equal_groups(self) -> float:
        """Share of groups whose rewards are all equal (their advantages are all 0)."""
        g = self.group_size
        groups = [self.rewards[i:i + g] for i in range(0, len(self.rewards), g)]
        return sum(len(set(r)) == 1 for r in groups) / max(1, len(groups))


def score(texts: List[str], answers: List[str], reward: str) -> List[float]:
    """1.0 / 0.0 per completion: math-verify (the trainer's reward) or exact match of the extracted answer."""
    if reward == "exact":
        return [float(extract_answer(t) == a.strip()) for t, a in zip(texts, answers)]
    with RewardWorker() as worker:
        rewards, _stats = worker.score(texts, answers)
    return [float(r) for r in rewards]


def sample(model, tokenizer, problems: List[Problem], *, samples: int, temperature: float, max_new_tokens: int,
           seed: int, reward: str, on_prompt: Optional[Callable[[], None]] = None) -> Samples:
    """Generate `samples` completions of each problem, score them and compute group advantages."""
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    cfg = SimpleNamespace(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)
    questions, prompt_ids, responses, answers = [], [], [], []
    for i, problem in enumerate(problems):
        ids = tokenizer.encode(format_prompt(tokenizer, problem.question), add_special_tokens=False)
        responses += generate_group(model, ids, samples, cfg, eos_ids=eos, pad_id=pad, seed=rollout_seed(seed, 0, i))
        prompt_ids += [ids] * samples
        questions += [problem.question] * samples
        answers += [problem.answer] * samples
        if on_prompt is not None:
            on_prompt()
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards = score(texts, answers, reward)
    advantages, _metrics = group_advantages(rewards, samples, std_scaling="group")
    return Samples(questions=questions, prompt_ids=prompt_ids, responses=responses, texts=texts, rewards=rewards,
                   advantages=advantages, group_size=samples, pad_id=int(pad))
