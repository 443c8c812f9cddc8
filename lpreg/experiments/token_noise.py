"""Random tokens in a warm start's answers, so that the policy learns a noise floor spread over the vocabulary.

A study's warm-start augment (`lpreg.trainer.tasks.register_warm_start_augment`; the `noisy-sparks` task
uses it): before each answer token except the last `keep_last` (a final answer the reward reads), with
probability `rate`, one uniform random non-special token of the vocabulary is inserted, in the input and
the label alike: the model learns to emit it, and to go on after it.
"""

import random
from dataclasses import dataclass
from typing import Any, Callable, List

__all__ = ["TokenNoise", "augment"]


@dataclass(frozen=True)
class TokenNoise:
    """`rate`: the chance of a random token before each answer token but the last `keep_last`."""

    rate: float
    keep_last: int = 0

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0 or self.keep_last < 0:
            raise ValueError(f"TokenNoise needs 0 <= rate < 1 and keep_last >= 0, got {self.rate}, {self.keep_last}")


def augment(noise: TokenNoise, tokenizer: Any) -> Callable[[List[int], random.Random], List[int]]:
    """The warm start's `augment(answer_ids, rng) -> answer_ids` that inserts `noise` into an answer."""
    vocab, specials = len(tokenizer), set(tokenizer.all_special_ids)

    def insert(answer: List[int], rng: random.Random) -> List[int]:
        if noise.rate <= 0:
            return answer
        free = len(answer) - noise.keep_last
        return [x for i, t in enumerate(answer) for x in
                ((_random_token(rng, vocab, specials), t) if i < free and rng.random() < noise.rate else (t,))]

    return insert


def _random_token(rng: random.Random, vocab_size: int, specials: set) -> int:
    while True:
        t = rng.randrange(vocab_size)
        if t not in specials:
            return t
