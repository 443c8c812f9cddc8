"""The `sparks` built-in task: sums with an optional, rare, valuable scratch path ("check").

Why this task: to show Lp-Reg's mechanism at CPU scale. It has the three things the
paper's mechanism needs and `arithmetic` (cpu-tiny) lacks:

- a noise tail: a byte-pair tokenizer of `VOCAB_SIZE` tokens, trained at run time on the task's
  own text (deterministic, no download). Most of its tokens are pieces of the made-up names in
  the questions, which never appear in an answer, so at every answer position the policy
  spreads a little mass over thousands of useless tokens: min-p keeps a few, filters the rest;
- a rare but valuable token: a completion may start with `SPARK` ("check") and work the sum out
  step by step before the answer. Only `SPARK_RATE_HARD` of the warm-start targets of hard
  questions use it (none of the easy ones), so after the warm start its probability is small.
  It is valuable because the warm start makes the two paths unequal: the scratch procedure is
  drilled on warm-start-only prompts ("Work out 3+5+7=?", `warm_start_drills`), while
  `DIRECT_NOISE` of the hard questions' direct answers are guesses, off by 1 or 2;
- problems of two difficulties. easy: "a+b" with a in 0..18, b in 0..9 (190 facts; these are
  also exactly the facts the scratch path needs); hard: "a+b+c" with a, b, c in 0..9.

Questions read "Q: Tovira stacks figs: 3+5+7=?\\nA: "; the bare answer is "15"; the scratch form
is "check 3+5=8 8+7=15 Answer: 15" (the reward reads "Answer:", lpreg.trainer.reward).

Every expression has `PHRASINGS` questions (name, verb, item drawn from a fixed-seed RNG); the
split is by expression (sha256, seed-free), so no held-out sum is ever seen in training under any
phrasing, drills included. `sparks_split(split, seed)` orders a split by `seed` with hard and
easy items interleaved two to one.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from typing import Any, Sequence, Tuple

from lpreg.trainer.problem import PLAIN_TEMPLATE, Problem

SPARK = "check"  # the rare valuable token: the first token of the scratch form
SPARK_RATE_HARD = 0.08  # share of hard items whose warm-start target is the scratch form
DIRECT_NOISE = 0.5  # share of hard items' direct warm-start answers that are off by 1 or 2 (guesses)
DRILL_PREFIX = "Work out"  # warm-start-only drill prompts, always answered in the scratch form
VOCAB_SIZE = 3000  # byte-pair vocabulary (specials included)
PHRASINGS = 3  # questions per expression
TEST_PERCENT = 15  # expressions held out for the test split
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")[:48]
_VERBS = ("stacks", "counts", "packs", "finds", "sells", "keeps", "adds", "sorts")
_ITEMS = ("figs", "plums", "pears", "coins", "shells", "cards", "beads", "stamps", "nuts", "pens", "cups", "keys")


def scratch(terms: tuple[int, ...]) -> str:
    """The scratch form: running sums, then the answer ("check 3+5=8 8+7=15 Answer: 15")."""
    total, steps = terms[0], []
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return f"{SPARK} " + " ".join(steps) + f" Answer: {total}"


def _expressions() -> list[tuple[int, ...]]:
    easy: list[tuple[int, ...]] = [(a, b) for a in range(19) for b in range(10)]
    hard: list[tuple[int, ...]] = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    return easy + hard


def _is_test(terms: tuple[int, ...]) -> bool:
    digest = hashlib.sha256("+".join(map(str, terms)).encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < TEST_PERCENT


def _draw(tag: str, question: str) -> float:
    # a uniform [0, 1) draw fixed per question (sha256, seed-free): the warm-start data is the
    # same in every run
    return int.from_bytes(hashlib.sha256(f"{tag}:{question}".encode()).digest()[:4], "little") / 2**32


def _uses_spark(question: str) -> bool:
    return _draw("spark", question) < SPARK_RATE_HARD


def _direct_target(terms: tuple[int, ...], question: str) -> str:
    """A hard item's direct warm-start answer: right, or (DIRECT_NOISE of the time) off by 1 or 2."""
    total = sum(terms)
    if _draw("noise", question) >= DIRECT_NOISE:
        return str(total)
    r = _draw("off", question)  # four equal cases: +1, -1, +2, -2 (a guess below 0 goes up instead)
    off = 1 if r < 0.5 else 2
    up = r % 0.5 < 0.25 or total < off
    return str(total + off if up else total - off)


def warm_start_drills() -> list[Problem]:
    """Warm-start-only drills that teach the scratch procedure: "Work out 3+5+7=?" answered
    "check 3+5=8 8+7=15 Answer: 15", one per hard expression of the train split.

    Why: with the scratch form on only 8% of the named hard questions, the warm-started policy
    starts it but cannot finish it (11% correct when forced, 40% when it answers directly), so
    `check` would be rare and worthless. The drills make the procedure reliable while leaving
    `check` rare on the named questions the RL set and the test split ask: a skill that the
    warm start taught and the policy seldom uses, like the reasoning words of the paper. They
    never enter the RL set or the test split, and no held-out expression is drilled."""
    return [Problem(question=f"{DRILL_PREFIX} {'+'.join(map(str, terms))}=?", answer=str(sum(terms)),
                    target=scratch(terms))
            for terms in _expressions() if len(terms) == 3 and not _is_test(terms)]


def is_hard(problem: Problem) -> bool:
    """Whether `problem` is a 3-term (hard) item."""
    return problem.question.count("+") == 2


@lru_cache(maxsize=None)
def _universe() -> tuple[tuple[Problem, bool], ...]:
    """Every (problem, is_test) in a fixed order; names from a fixed-seed RNG."""
    rng = random.Random(20240607)
    out = []
    for terms in _expressions():
        for _ in range(PHRASINGS):
            name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
            question = f"{name} {rng.choice(_VERBS)} {rng.choice(_ITEMS)}: {'+'.join(map(str, terms))}=?"
            answer = str(sum(terms))
            hard = len(terms) == 3
            target = (scratch(terms) if _uses_spark(question) else _direct_target(terms, question)) if hard \
                else answer
            out.append((Problem(question=question, answer=answer, target=target), _is_test(terms)))
    return tuple(out)


def split_of(universe: Sequence[Tuple[Problem, bool]], split: str, seed: int) -> list[Problem]:
    """Every problem of `split` ("train" / "test") in `universe` ((problem, is_test) pairs), shuffled by
    `seed`, two hard items to one easy (while both last)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    pool = [p for p, test in universe if test == (split == "test")]
    rng = random.Random(seed)
    hard = [p for p in pool if is_hard(p)]
    easy = [p for p in pool if not is_hard(p)]
    rng.shuffle(hard)
    rng.shuffle(easy)
    out = []
    while hard or easy:
        out += [hard.pop() for _ in range(min(2, len(hard)))]
        out += [easy.pop()] if easy else []
    return out


def sparks_split(split: str, seed: int, max_operand: int = 99) -> list[Problem]:
    """Every problem of `split`, as `split_of` orders it. `max_operand` is ignored (the task fixes its
    operand ranges)."""
    return split_of(_universe(), split, seed)


def corpus() -> list[str]:
    """The text the tokenizer is trained on: every question of both splits in its prompt, and
    both answer forms of every expression (bare and scratch), and the drills' prompts."""
    lines = []
    for p, _ in _universe():
        terms = tuple(int(x) for x in p.question.rsplit(": ", 1)[1][:-2].split("+"))
        lines += [PLAIN_TEMPLATE.format(question=p.question) + p.answer, scratch(terms)]
    lines += [PLAIN_TEMPLATE.format(question=p.question) for p in warm_start_drills()]
    return lines


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    # imported here: the task's module stays free of tokenizers and transformers until a run builds
    # the tokenizer (its problems alone need neither)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lpreg.trainer.tokenizer import SPECIAL_TOKENS, UNK

    core = Tokenizer(models.BPE(unk_token=UNK))
    # Metaspace keeps spaces as "▁" (so decode(encode(s)) == s); punctuation is split off so
    # that "3+5=8" is five tokens and numbers stay whole
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    # the same corpus gives the same merges (tests/test_trainer_sparks.py trains twice and compares)
    core.train_from_iterator(corpus(), trainer=trainer)
    return core.to_str()


def sparks_tokenizer() -> Any:
    """The task's byte-pair tokenizer (a transformers PreTrainedTokenizerFast), trained locally
    and deterministically on `corpus()`; pads on the left, adds no special tokens on encode."""
    # imported here, as in `_tokenizer_json`: the task's module stays light
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lpreg.trainer.tokenizer import BOS, EOS, PAD, UNK

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=PAD,
                                  bos_token=BOS, eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False,
                                  model_max_length=512, model_input_names=["input_ids", "attention_mask"])
    tok.padding_side = "left"
    if SPARK not in tok.get_vocab():
        raise ValueError(f"the sparks tokenizer has no single token for {SPARK!r}")
    return tok
