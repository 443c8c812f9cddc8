"""Built-in task with verifiable answers: integer addition and subtraction.

Problems are `a+b` and `a-b` with operands in 0..99 (so one- and two-digit operands, and
answers from -99 to 198). The universe holds 2 * 100 * 100 = 20,000 problems; a fixed
hash of the problem text (independent of any seed) puts 10% of them in the test split,
so the train and test splits are disjoint and stable across runs, machines and seeds.

`arithmetic_problems(n, seed, split)` draws `n` distinct problems of that split with
`random.Random(seed)`, stratified: the eight buckets (operator x one- or two-digit a x
one- or two-digit b) are equally likely, although the two-digit-by-two-digit buckets
hold 81 times as many problems as the one-by-one buckets. Uniform sampling would be 81%
two-by-two problems; stratified, the task has easy (9+3), medium (47+5) and hard
(47-85) problems in equal parts, which is what RL wants: groups of samples with mixed
success. (Weighted sampling without replacement by Efraimidis-Spirakis keys, so `n`
can go up to the whole split; once a small bucket is used up the rest come from the
others.)

Why this task: a tiny model learns it to partial competence in a minute or two on two
CPU cores (one-digit sums are easy, carries, borrows and signs are hard), so RL starts
with non-zero reward and has room to improve. The gold answer is the integer
as a string ("19", "-3"), which math-verify parses and the reward's number fallback
extracts.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from lpreg.trainer.problem import Problem

__all__ = ["Problem", "BuiltinTask", "TASKS", "register_task", "WarmStartAugment", "WARM_START_AUGMENTS",
           "register_warm_start_augment", "arithmetic_problems", "arithmetic_split", "split_size", "operands_within"]

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 10  # share of the universe held out for the test split
MAX_OPERAND = 99


def _make(a: int, op: str, b: int) -> Problem:
    value = a + b if op == "+" else a - b
    return Problem(question=f"{a}{op}{b}=?", answer=str(value))


def _is_test(problem: Problem) -> bool:
    # sha256 of the text, not hash(): Python's str hash is salted per process.
    digest = hashlib.sha256(problem.question.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % 100 < TEST_FRACTION_PERCENT


@lru_cache(maxsize=None)
def _split_pool(split: str, max_operand: int = MAX_OPERAND) -> tuple[Problem, ...]:
    # Enumeration order is fixed (op, a, b), so the pool is identical everywhere. A problem's
    # split does not depend on max_operand: smaller pools are subsets of the full ones.
    pool = [
        _make(a, op, b)
        for op in ("+", "-")
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]
    want_test = split == "test"
    return tuple(p for p in pool if _is_test(p) == want_test)


def _check(split: str, max_operand: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(max_operand, int) or not 0 <= max_operand <= MAX_OPERAND:
        raise ValueError(f"max_operand must be an int in [0, {MAX_OPERAND}], got {max_operand!r}")


def arithmetic_problems(n: int, seed: int, split: str = "train", *, max_operand: int = MAX_OPERAND) -> list[Problem]:
    """Draw `n` distinct problems of `split` ("train" or "test"), deterministic in `seed`.

    Returns a list of `Problem`. The same arguments always give the same list, and no
    question appears in both splits. `max_operand` (default 99) restricts both operands
    to [0, max_operand], an easier task (19 keeps 800 problems, 10% of them test).
    Raises ValueError for an unknown split, a max_operand outside [0, 99], or an `n`
    outside [0, split_size(split, max_operand)] (17,973 train and 2,027 test at 99).
    """
    _check(split, max_operand)
    pool = _split_pool(split, max_operand)
    if not isinstance(n, int) or n < 0 or n > len(pool):
        raise ValueError(f"n must be an int in [0, {len(pool)}] for split={split!r}, got {n!r}")
    rng = random.Random(seed)
    sizes = _bucket_sizes(split, max_operand)
    # Efraimidis-Spirakis: key = u ** (1 / w) with weight w = 1 / bucket size; the n largest
    # keys are a weighted sample without replacement. log(key) = log(u) * bucket size.
    keys = [math.log(1.0 - rng.random()) * sizes[_bucket(p)] for p in pool]
    order = sorted(range(len(pool)), key=lambda i: keys[i], reverse=True)
    return [pool[i] for i in order[:n]]


def _bucket(problem: Problem) -> tuple[str, int, int]:
    m = re.fullmatch(r"(\d+)([+-])(\d+)=\?", problem.question)
    if m is None:
        raise ValueError(f"not an arithmetic question (a+b=? or a-b=?): {problem.question!r}")
    a, op, b = m.groups()
    return op, len(a), len(b)


@lru_cache(maxsize=None)
def _bucket_sizes(split: str, max_operand: int) -> dict[tuple[str, int, int], int]:
    sizes: dict[tuple[str, int, int], int] = {}
    for p in _split_pool(split, max_operand):
        sizes[_bucket(p)] = sizes.get(_bucket(p), 0) + 1
    return sizes


def split_size(split: str, max_operand: int = MAX_OPERAND) -> int:
    """Number of problems in `split` (with operands <= max_operand)."""
    _check(split, max_operand)
    return len(_split_pool(split, max_operand))


def operands_within(problem: Problem, max_operand: int) -> bool:
    """Whether both operands of a built-in question ("a+b=?" / "a-b=?") are <= max_operand."""
    a, b = re.findall(r"\d+", problem.question)[:2]
    return int(a) <= max_operand and int(b) <= max_operand


def arithmetic_split(split: str, seed: int, max_operand: int) -> list[Problem]:
    """The whole `split` in the order `arithmetic_problems` draws it from the full (0..99) split
    with `seed`, keeping problems whose operands are <= max_operand (the trainer's data)."""
    pool = arithmetic_problems(split_size(split), seed, split)
    return [p for p in pool if operands_within(p, max_operand)]


def _char_tokenizer() -> Any:
    # imported here: `import lpreg.trainer.tasks` stays free of transformers (lpreg/trainer/__init__.py)
    from lpreg.trainer.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task the trainer can run with no file (`--task NAME`, used when --data is unset): its
    data split and its tokenizer; the reward is the trainer's (math-verify against the gold answer).

    split_problems(split, seed, max_operand): every problem of "train" or "test", in a
        seed-determined order (the trainer takes its RL set and held-out set from the front);
    tokenizer(): the tokenizer of the tiny policy built for it (when --model is unset);
    warm_start_extra(): extra problems for the warm start only (never in the RL set or the held-out split).
    """

    split_problems: Callable[[str, int, int], list[Problem]]
    tokenizer: Callable[[], Any]
    warm_start_extra: Callable[[], list[Problem]] | None = None


@dataclass(frozen=True)
class WarmStartAugment:
    """A change of a task's warm-start targets (`register_warm_start_augment`).

    make(tokenizer) -> augment(answer_ids, rng) -> answer_ids: applied to every target the warm start
        draws, with the warm start's own RNG (lpreg.trainer.model.warm_start's `augment`);
    key: a JSON-serialisable description, part of the warm-start cache's key (a changed augment never
        loads a stale entry).
    """

    make: Callable[[Any], Callable[[list[int], random.Random], list[int]]]
    key: dict


# Adding a task: write its two functions and register it (`register_task`); a preset can then set
# task=NAME. A study registers its tasks this way (lpreg.experiments).
TASKS: dict[str, BuiltinTask] = {
    "arithmetic": BuiltinTask(split_problems=arithmetic_split, tokenizer=_char_tokenizer),
}
# task name -> the change of its warm-start targets (none for most tasks)
WARM_START_AUGMENTS: dict[str, WarmStartAugment] = {}


def register_task(name: str, task: BuiltinTask) -> None:
    """Add (or replace) a built-in task: `--task NAME` then runs it."""
    if not isinstance(task, BuiltinTask):
        raise ValueError(f"register_task({name!r}): task must be a BuiltinTask, got {type(task).__name__}")
    TASKS[name] = task


def register_warm_start_augment(task: str, augment: WarmStartAugment) -> None:
    """Add (or replace) the change of the built-in task `task`'s warm-start targets."""
    if not isinstance(augment, WarmStartAugment):
        raise ValueError(f"register_warm_start_augment({task!r}): augment must be a WarmStartAugment, "
                         f"got {type(augment).__name__}")
    WARM_START_AUGMENTS[task] = augment
