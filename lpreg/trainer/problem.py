"""A problem with a verifiable answer, and the plain prompt it is asked in.

Its own module, imported by the tasks, the model, the data loader and the loop, so that none of
them imports another only for this (`tasks` -> `sparks` -> `model` -> `tasks` was a cycle).
"""

from dataclasses import dataclass
from typing import Optional

__all__ = ["Problem", "PLAIN_TEMPLATE", "TokenNoise"]

# the prompt of a tokenizer without a chat template; the model then writes the answer and eos
PLAIN_TEMPLATE = "Q: {question}\nA: "


@dataclass(frozen=True)
class Problem:
    """One problem: the question text and its gold answer (a string math-verify parses)."""

    question: str
    answer: str
    target: Optional[str] = None  # the warm start's target text when it is not the bare answer


@dataclass(frozen=True)
class TokenNoise:
    """Random tokens in a warm start's answers, so that the policy learns a noise floor spread over
    the vocabulary: before each answer token except the last `keep_last` (a final answer the reward
    reads), with probability `rate`, one uniform random non-special token of the vocabulary is
    inserted (in the input and the label alike: the model learns to emit it, and to go on after it)."""

    rate: float
    keep_last: int = 0

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0 or self.keep_last < 0:
            raise ValueError(f"TokenNoise needs 0 <= rate < 1 and keep_last >= 0, got {self.rate}, {self.keep_last}")
