"""A problem with a verifiable answer, and the plain prompt it is asked in.

Its own module, imported by the tasks, the model, the data loader and the loop, so that none of
them imports another only for this (a task module importing the model, which imports the tasks, was a cycle).
"""

from dataclasses import dataclass
from typing import Optional

__all__ = ["Problem", "PLAIN_TEMPLATE"]

# the prompt of a tokenizer without a chat template; the model then writes the answer and eos
PLAIN_TEMPLATE = "Q: {question}\nA: "


@dataclass(frozen=True)
class Problem:
    """One problem: the question text and its gold answer (a string math-verify parses)."""

    question: str
    answer: str
    target: Optional[str] = None  # the warm start's target text when it is not the bare answer
