"""The `noisy-sparks` task: `sparks` with a fixed output floor, noise in the warm start, and a pool of thousands.

Its departures from the paper come first: the tail mass min-p removes is a constant added to the
model's output (the floor, 25%), not learned (without it the warm-started policy keeps ~0.98 of its mass
where Lp-Reg selects, as on `sparks`); the floor bounds the entropy from below, so entropy collapse cannot
happen; and its presets use rho = 0.5, 50 times the paper's 0.01.

Why a second task: on `sparks` (cpu-sparks) the tiny policy puts almost all its mass on a few tokens,
so the min-p proxy keeps about 99% of it where Lp-Reg selects (k3's push, (1/m - 1)(1 - p_y), is ~1%
of the negative-advantage push), and RL on 96 recurring problems overfits them (held-out accuracy
falls). The paper's premise is a policy whose tail holds real mass: the low-probability tokens of a
negative-advantage response mix valuable "sparks" with noise, min-p removes the noise, and the
renormalised proxy lifts the rare tokens that survive. This task builds that premise in:

- a noise floor that RL cannot train away: the policy's next-token distribution is
  p = (1 - FLOOR) softmax(z) + FLOOR / V at every position (the output transform "output_floor",
  lpreg.experiments.output_floor, set by the noisy-sparks presets and saved with every checkpoint),
  25% of the mass spread over the 3,000-token vocabulary,
  ~1e-4 per token, far below min-p's cut (kappa = 0.02 times the largest probability). So the min-p
  proxy keeps about 0.74 of the mass wherever Lp-Reg selects (1/m - 1 ~ 0.35), for the whole run. A
  floor the policy learns instead (random tokens in the warm start alone) is trained away within 10 to
  20 RL steps at the learning rates a short CPU run needs (docs/research/cpu_regime_pilots.md): AdamW moves every
  noise token's embedding row by about the learning rate per step. The paper's 1.5B model at lr 1e-6
  keeps its tail over a run; a fixed floor is this task's stand-in for that;
- a policy that goes on after a random token: in the warm start, before each answer token except the
  final " Answer: 15" (`NOISE`: keep_last 3), with probability 0.25, a random vocabulary token is
  inserted (input and label alike: lpreg.experiments.token_noise, the task's warm-start augment), as
  often as the floor samples one.
  A random token before the final "Answer:" costs nothing; one inside it breaks the answer (the reward
  reads the line after the last "Answer:"), so the floor costs reward and RL must work around it;
- a rare, valuable token: `check` starts a worked answer ("check 3+5=8 8+7=15 Answer: 15"), 8% of
  the hard questions' warm-start targets; drills teach the procedure, half the direct answers are
  guesses (lpreg.experiments.sparks, unchanged);
- a pool of thousands: every expression of `sparks` (190 "a+b", 1,000 "a+b+c") under `PHRASINGS`
  made-up questions each; the test split holds 15% of the expressions out under every phrasing (the
  same seed-free sha256 rule as `sparks`), so the held-out set is disjoint by construction. RL draws
  its prompts from the whole training split (~8,000 problems): a short run sees each at most once, so
  what RL learns must carry over to new questions (working around the noise, the right sum, the
  worked form).

The tokenizer is `sparks`' (its corpus holds every character these questions use); noise tokens are
drawn from its whole vocabulary. Questions read "Q: Kobera packs nuts: 3+5+7=?\\nA: "; the direct
answer is " 15 Answer: 15" (the guess sits before "Answer:", where a random token is harmless and the
floor lets Lp-Reg act on it), the worked one "check 3+5=8 8+7=15 Answer: 15".
"""

from __future__ import annotations

import random
from functools import lru_cache

from lpreg.experiments import sparks
from lpreg.experiments.token_noise import TokenNoise
from lpreg.trainer.problem import Problem

__all__ = ["NOISE", "FLOOR", "ANSWER", "PHRASINGS", "noisy_split", "universe", "expression"]

# before each answer token but the final " Answer: 15", with probability 0.25, a random vocabulary token
NOISE = TokenNoise(rate=0.25, keep_last=3)
FLOOR = 0.25  # the policy's fixed output floor (the presets' --output-transform): the mass min-p removes
ANSWER = "Answer:"  # the direct form's prefix: " Answer: 15" (tokens "▁Answer", ":", "▁15")
PHRASINGS = 8  # made-up questions per expression (sparks has 3)
_NAME_SEED = 20261206  # the questions' names, verbs and items (sparks uses another seed: other names)


def expression(problem: Problem) -> str:
    """The sum a question asks ("3+5+7=?")."""
    return problem.question.rsplit(": ", 1)[1]


@lru_cache(maxsize=None)
def universe() -> tuple[tuple[Problem, bool], ...]:
    """Every (problem, is_test) in a fixed order: `PHRASINGS` questions per expression, targets as in
    `sparks` (the scratch form for 8% of hard questions, a guess for half the other hard ones)."""
    rng = random.Random(_NAME_SEED)
    out = []
    for terms in sparks._expressions():
        test = sparks._is_test(terms)
        seen: set[str] = set()
        while len(seen) < PHRASINGS:
            name = "".join(rng.choice(sparks._SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
            question = f"{name} {rng.choice(sparks._VERBS)} {rng.choice(sparks._ITEMS)}: {'+'.join(map(str, terms))}=?"
            if question in seen:
                continue
            seen.add(question)
            answer = str(sum(terms))
            if len(terms) == 3 and sparks._uses_spark(question):
                target = sparks.scratch(terms)
            else:  # the direct form, " 15 Answer: 15" (a guess for half the hard questions)
                said = sparks._direct_target(terms, question) if len(terms) == 3 else answer
                target = f" {said} {ANSWER} {said}"
            out.append((Problem(question=question, answer=answer, target=target), test))
    return tuple(out)


def noisy_split(split: str, seed: int, max_operand: int = 99) -> list[Problem]:
    """Every problem of `split`, ordered as `sparks.split_of` orders it. `max_operand` is ignored (the
    task fixes its operand ranges)."""
    return sparks.split_of(universe(), split, seed)
