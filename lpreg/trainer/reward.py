"""Verifiable rewards: math-verify in a killable worker process.

    with RewardWorker(timeout_s=5.0) as worker:
        rewards, stats = worker.score(completions, answers)   # 1.0 / 0.0 each
        # stats = {"timeouts": int, "parse_failures": int}

Answer extraction (`extract_answer`, pure Python, also used for majority voting):
  1. the content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced;
  2. else the text after the last "Answer:" (the DAPO format: a final "Answer: X" line);
  3. else, when the whole completion (stripped, as in 1-2) is one number ("-12", "1,234",
     "3.5"), that number. This fallback exists because the built-in task's completion is
     the bare number ("19") after the prompt's "A: ". It accepts only a number: "1-3" or
     "the total is 12 apples" is no answer (reading a last number out of arbitrary text
     would score "1-3" as -3). Pass `number_fallback=False` to require 1 or 2.
The extracted string and the gold answer are each wrapped as `\\boxed{...}` and parsed
by math-verify, then compared with `verify(gold, pred)` (gold first: verify is not
symmetric). No extracted answer, an answer over 1,000 characters, or an empty parse
counts as a parse failure and scores 0.

Timeouts, at two depths, per sample:
  - soft: the worker runs each sample under `signal.setitimer(ITIMER_REAL, timeout_s)`
    and turns the alarm into a timeout result. math-verify's own timeouts are turned off
    (they use `signal.alarm`, which shares that timer and takes whole seconds only, and
    work only on a main thread; the worker runs the samples on its main thread).
  - hard: a computation that never returns to the interpreter (a C-level big-integer
    power, a stopped process) ignores signals, so the parent waits at most
    `timeout_s + kill_grace_s` per sample; then it kills the worker, scores that sample 0
    as a timeout, starts a new worker and resubmits the rest of the batch.
Either way the sample counts in `stats["timeouts"]`; a worker that dies on a sample is
counted the same way.

Cost: one worker process for the object's life; one message per batch out and one small
message per sample back. The worker is a plain `python -c` process running this file
through runpy: it imports only the standard library and math-verify (not torch, not
lpreg), so it starts in about a second and restarts cheaply.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from multiprocessing.connection import Connection

MAX_ANSWER_CHARS = 1000  # longer extracted answers are parse failures, not parsed
_WORKER_RUN_NAME = "__lpreg_reward_worker__"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"answer\s*[:：]", re.IGNORECASE)
# the whole (cleaned) completion must be one number: "19", "-7", "1,234", "3.5"
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last balanced `\\boxed{...}` (or `\\fbox{...}`) in `text`, or None."""
    # Scan every \boxed{ from the last one back and return the first with balanced braces.
    for match in reversed(list(_BOX_RE.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def _clean(answer: str) -> str:
    answer = answer.strip()
    # "$19$." and "**19**" are common wrappers around a final answer.
    answer = answer.rstrip(".").strip().strip("*").strip()
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer


def extract_answer(text: str, *, number_fallback: bool = True) -> str | None:
    """The final answer written in `text` (rules in the module docstring), or None."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return _clean(boxed)
    matches = list(_ANSWER_RE.finditer(text))
    if matches:
        line = text[matches[-1].end() :].split("\n", 1)[0]
        if _clean(line):
            return _clean(line)
    if number_fallback:
        bare = _clean(text)
        if _NUMBER_RE.fullmatch(bare):
            return bare.replace(",", "")
    return None


class RewardWorker:
    """Scores completions against gold answers with math-verify in a worker process."""

    def __init__(self, timeout_s: float = 5.0, *, number_fallback: bool = True,
                 kill_grace_s: float = 1.0, startup_timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.number_fallback = number_fallback
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.restarts = 0  # workers started after a hard timeout or crash
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._ready = False
        self._start()

    # -- process management --------------------------------------------------------------

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name=%r)" % _WORKER_RUN_NAME
        args = [sys.executable, "-c", code, os.path.abspath(__file__), str(to_child_r), str(to_parent_w)]
        try:
            self._proc = subprocess.Popen(
                args, pass_fds=(to_child_r, to_parent_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            os.close(to_child_r)
            os.close(to_parent_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(to_parent_r, writable=False)
        self._ready = False  # the "ready" message is awaited lazily, by the first batch

    def _pipes(self) -> tuple[Connection, Connection]:
        """(send, recv) of the current worker; _start sets both with the process, _kill clears them."""
        if self._send is None or self._recv is None:
            raise RuntimeError("RewardWorker is closed")
        return self._send, self._recv

    def _wait_ready(self) -> None:
        if self._ready:
            return
        _, recv = self._pipes()
        if not recv.poll(self.startup_timeout_s):
            self._kill()
            raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s} s")
        try:
            message = recv.recv()
        except EOFError:
            message = "exited during start-up (see its stderr above)"
        if message != ("ready",):
            self._kill()
            raise RuntimeError(f"reward worker failed to start: {message!r}")
        self._ready = True

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._proc = self._send = self._recv = None

    @property
    def pid(self) -> int | None:
        """Process id of the current worker (None after close)."""
        return None if self._proc is None else self._proc.pid

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        """Stop the worker. Safe to call twice."""
        # An idle worker exits on request; one still starting up (or busy) is killed.
        if self._proc is not None and self._send is not None and self._ready and self._proc.poll() is None:
            try:
                self._send.send(("exit",))
                self._proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> "RewardWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- scoring -------------------------------------------------------------------------

    def score(self, completions: list[str], answers: list[str]) -> tuple[list[float], dict]:
        """Rewards (1.0 correct, 0.0 otherwise) for each completion against its gold answer.

        Returns `(rewards, {"timeouts": int, "parse_failures": int})`. Never raises for a
        bad sample; raises ValueError for mismatched lengths and RuntimeError when the
        object is closed or a worker cannot be started at all.
        """
        if len(completions) != len(answers):
            raise ValueError(
                f"completions and answers must have the same length, got {len(completions)} "
                f"and {len(answers)}"
            )
        if self._proc is None:
            raise RuntimeError("RewardWorker is closed")
        rewards = [0.0] * len(completions)
        stats = {"timeouts": 0, "parse_failures": 0}
        pending = list(range(len(completions)))
        while pending:
            self._wait_ready()
            batch = [(i, str(completions[i]), str(answers[i])) for i in pending]
            try:
                self._pipes()[0].send(("score", batch, self.timeout_s, self.number_fallback))
            except OSError:  # the worker died while idle (killed from outside): replace it
                self._restart()
                continue
            done = self._collect(pending, rewards, stats)
            pending = pending[done:]
        return rewards, stats

    def _collect(self, pending: list[int], rewards: list[float], stats: dict) -> int:
        # Read per-sample results in order; returns how many of `pending` were settled.
        # On a hard timeout or a dead worker, the current sample is settled as a timeout
        # and a fresh worker is started for the caller to resubmit the rest.
        _, recv = self._pipes()
        for n, index in enumerate(pending):
            try:
                arrived = recv.poll(self.timeout_s + self.kill_grace_s)
                message = recv.recv() if arrived else None
            except (EOFError, OSError):
                message = None
            if message is None:
                stats["timeouts"] += 1
                self._restart()
                return n + 1
            got, reward, kind = message
            assert got == index, f"reward worker answered sample {got}, expected {index}"
            rewards[index] = reward
            if kind in stats:
                stats[kind] += 1
        return len(pending)


# -- the worker process (runs with the standard library and math-verify only) ---------------


class _SoftTimeout(BaseException):
    # BaseException, like math-verify's own TimeoutException, so that the libraries'
    # `except Exception` handlers do not swallow the alarm and report a plain failure.
    pass


def _worker_main(read_fd: int, write_fd: int) -> None:
    recv, send = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:  # imported here: only the worker process runs math-verify; the trainer never imports it
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except Exception as err:  # reported to the parent, which raises RuntimeError
        send.send(("import failed", repr(err)))
        return
    # Timeouts are disabled in math-verify's calls on purpose (see the module docstring);
    # silence its warning about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    gold_cache: dict[str, list] = {}

    def parsed(answer: str) -> list:
        # math-verify reads \boxed{} content first, so wrapping makes both plain numbers
        # and LaTeX ("\frac{1}{2}") parse the same way.
        return parse("\\boxed{" + answer + "}", parsing_timeout=None, raise_on_error=True)

    def score_one(completion: str, gold: str, number_fallback: bool) -> tuple[float, str]:
        pred = extract_answer(completion, number_fallback=number_fallback)
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            return 0.0, "parse_failures"
        if gold not in gold_cache:
            if len(gold_cache) > 10_000:
                gold_cache.clear()
            gold_cache[gold] = parsed(_clean(gold))
        gold_parsed, pred_parsed = gold_cache[gold], parsed(pred)
        if not gold_parsed or not pred_parsed:
            return 0.0, "parse_failures"
        ok = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=False)
        return (1.0 if ok else 0.0), "ok"

    send.send(("ready",))
    while True:
        try:
            message = recv.recv()
        except EOFError:  # the parent is gone
            return
        if message[0] == "exit":
            return
        _, batch, timeout_s, number_fallback = message
        for index, completion, gold in batch:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                reward, kind = score_one(completion, gold, number_fallback)
            except (_SoftTimeout, TimeoutException):
                reward, kind = 0.0, "timeouts"
            except Exception:  # sympy/latex errors on odd input: a failed parse, not a crash
                reward, kind = 0.0, "parse_failures"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            send.send((index, reward, kind))


if __name__ == _WORKER_RUN_NAME:
    _worker_main(int(sys.argv[2]), int(sys.argv[3]))
