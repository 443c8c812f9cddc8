"""RewardWorker (math-verify in a killable worker process) and answer extraction."""

import os
import signal
import time

import pytest

from lpreg.trainer.reward import RewardWorker, extract_answer


@pytest.fixture(scope="module")
def worker():
    # One worker for the module: starting one costs an interpreter and a math-verify import.
    with RewardWorker(timeout_s=1.5) as w:
        yield w


@pytest.mark.parametrize(
    "text, expected",
    [
        ("19", "19"),
        ("-7", "-7"),
        ("1,234", "1234"),
        (" 3.5.", "3.5"),
        # the number fallback accepts only a number: no last number read out of other text
        ("so the total is 1,234 apples", None),
        ("1-3", None),
        ("12 13", None),
        ("first 3 then \\boxed{\\frac{1}{2}} and 5", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("work 1 2 3\nAnswer: $-3$.", "-3"),
        ("Answer: 4\nAnswer: 5", "5"),
        ("\\boxed{a{b} unbalanced, Answer: 8", "8"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_without_number_fallback():
    assert extract_answer("the result is 12", number_fallback=False) is None
    assert extract_answer("Answer: 12", number_fallback=False) == "12"


def test_correct_incorrect_and_formats(worker):
    completions = ["19", "18", "Answer: 19", "\\boxed{19}", "\\boxed{0.5}", "We get \\boxed{\\dfrac{1}{2}}.",
                   "Answer: -27", "1,000", "x+1 \\boxed{x + 1}"]
    answers = ["19", "19", "19", "19", "\\frac{1}{2}", "0.5", "-27", "1000", "1+x"]
    rewards, stats = worker.score(completions, answers)
    assert rewards == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert stats == {"timeouts": 0, "parse_failures": 0}


def test_parse_failures_are_counted_not_raised(worker):
    completions = ["I do not know", "", "\\boxed{}", "Answer: " + "7" * 1200, "12"]
    rewards, stats = worker.score(completions, ["3"] * 5)
    assert rewards == [0.0] * 5
    assert stats == {"timeouts": 0, "parse_failures": 4}


def test_empty_batch_and_length_mismatch(worker):
    assert worker.score([], []) == ([], {"timeouts": 0, "parse_failures": 0})
    with pytest.raises(ValueError, match="same length"):
        worker.score(["1"], [])


@pytest.mark.parametrize("bomb", ["Answer: \\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "(" * 40 + "1" + ")" * 40 + "}"])
def test_pathological_input_times_out_and_worker_recovers(worker, bomb):
    # A power tower (verify tries to evaluate it) and deep brackets (the LaTeX parser
    # backtracks) both take far longer than the timeout.
    start = time.perf_counter()
    rewards, stats = worker.score(["19", bomb, "20"], ["19", "19", "20"])
    elapsed = time.perf_counter() - start
    assert rewards == [1.0, 0.0, 1.0]
    assert stats["timeouts"] == 1
    # Samples before and after finish in well under a second each; the bomb is cut off
    # at timeout_s (soft) or timeout_s + kill_grace_s (hard), plus a restart if killed.
    assert elapsed < worker.timeout_s + worker.kill_grace_s + 10.0
    assert worker.score(["5"], ["5"]) == ([1.0], {"timeouts": 0, "parse_failures": 0})


def test_unresponsive_worker_is_killed_and_replaced():
    # SIGSTOP freezes the worker the way a C-level computation would: no signal handler
    # runs, so only the parent's deadline and a kill can recover.
    with RewardWorker(timeout_s=1.0, kill_grace_s=0.5) as w:
        assert w.score(["1"], ["1"])[0] == [1.0]  # started and warm
        frozen = w.pid
        os.kill(frozen, signal.SIGSTOP)
        start = time.perf_counter()
        rewards, stats = w.score(["2", "3", "4"], ["2", "3", "5"])
        waited = time.perf_counter() - start
        assert rewards == [0.0, 1.0, 0.0]  # the first sample hit the frozen worker
        assert stats == {"timeouts": 1, "parse_failures": 0}
        assert w.pid != frozen and w.restarts == 1
        assert waited >= 1.5  # it did wait out timeout_s + kill_grace_s
        assert w.score(["7"], ["7"]) == ([1.0], {"timeouts": 0, "parse_failures": 0})
    assert w.pid is None
    with pytest.raises(RuntimeError, match="closed"):
        w.score(["1"], ["1"])


def test_worker_killed_while_idle_is_replaced():
    with RewardWorker(timeout_s=2.0) as w:
        assert w.score(["1"], ["1"])[0] == [1.0]
        dead = w.pid
        os.kill(dead, signal.SIGKILL)
        time.sleep(0.2)
        assert w.score(["2", "3"], ["2", "4"]) == ([1.0, 0.0], {"timeouts": 0, "parse_failures": 0})
        assert w.pid != dead and w.restarts == 1


def test_worker_process_exits_on_close():
    w = RewardWorker(timeout_s=1.0)
    pid = w.pid
    w.close()
    w.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardWorker(timeout_s=0)
