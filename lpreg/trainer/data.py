"""Local problem sets: .jsonl and .parquet files of question/answer rows.

    problems, skipped = load_problems("gsm8k_test.jsonl")   # skipped: a SkippedRow per unusable row
    data = load_problem_file("gsm8k_test.jsonl", flag="--data", max_skipped_frac=0.01)  # with the report

Columns are detected per file, first match wins:
    question: question | problem | prompt
    answer:   answer | solution | ground_truth | final_answer | reward_model
A column counts as present if any row has it. "prompt" may also be a chat message list
(verl / DAPO parquet files): the content of its last user message is the question.
"reward_model" is the verl convention `{"ground_truth": ...}`.

Gold answers are reduced to the final answer the reward compares against:
  - GSM8K style "... #### 1,234": the text after the last "####", thousands commas
    dropped ("1234");
  - a solution with `\\boxed{...}`: the content of the last box;
  - a "solution" column with neither: the row is skipped (a whole worked solution is not
    a gold answer);
  - anything else: the stripped text. Integer answers (`{"answer": 42}`) become "42";
    they are common in JSON exports and unambiguous.

Rows that cannot be used are skipped, each with its line number (jsonl; row number for parquet)
and its reason (`SkippedRow`): malformed JSON lines, lines that are not objects, missing or empty
question/answer, a question that is not a string, an answer that is not a string or an integer.
Nothing is dropped silently: every reader reports them (`ProblemFile`: the first few in the log, all
of them in the run directory's skipped_rows.jsonl), and past `max_skipped_frac` of the file's rows
(the trainer's --max-skipped-frac, default 1%) `ProblemFile.check` stops the run before training.
`ValueError`, naming the file, for a path that does not exist, an unknown extension, no
recognisable columns, or no usable row at all.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import IO, Optional

from lpreg.trainer.problem import Problem
from lpreg.trainer.reward import last_boxed

QUESTION_COLUMNS = ("question", "problem", "prompt")
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "final_answer", "reward_model")
EXTENSIONS = (".jsonl", ".parquet")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
SKIPPED_FILE = "skipped_rows.jsonl"  # a run directory's list of every skipped row
LOG_FIRST = 5  # skipped rows named in the log (all of them go to SKIPPED_FILE)


@dataclass(frozen=True)
class SkippedRow:
    """A row of a problem file that was not used: where (`unit` "line" for jsonl, 1-based; "row" for
    parquet, 1-based) and why."""

    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


def _read_jsonl(path: str) -> tuple[list[tuple[int, dict]], list[SkippedRow]]:
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(SkippedRow(number, f"invalid JSON ({err.msg} at column {err.colno})"))
                continue
            if isinstance(row, dict):
                rows.append((number, row))
            else:
                bad.append(SkippedRow(number, f"not a JSON object (a {type(row).__name__})"))
    return rows, bad


def _read_parquet(path: str) -> tuple[list[tuple[int, dict]], list[SkippedRow]]:
    try:  # imported here: pyarrow is optional (the "train" extra) and only parquet files need it
        import pyarrow.parquet as pq
    except ImportError as err:  # pyarrow is in the "train" extra
        raise ValueError(f"reading {path!r} needs pyarrow (pip install 'lpreg[train]')") from err
    try:
        return list(enumerate(pq.read_table(path).to_pylist(), 1)), []
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"could not read parquet file {path!r}: {err}") from err


def _question_text(value) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    # A chat prompt: [{"role": "user", "content": "..."}, ...] -> last user message.
    if isinstance(value, (list, tuple)):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == "user":
                return _question_text(message.get("content"))
    return None


def reduce_answer(value, column: str = "answer") -> str | None:
    """The final answer in a gold field, or None if there is none (rules in the docstring)."""
    if column == "reward_model":
        value = value.get("ground_truth") if isinstance(value, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
        return (text.replace(",", "") if _THOUSANDS_RE.match(text) else text) or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if column == "solution":
        return None
    return text


def _detect(rows: list[dict], candidates: tuple[str, ...]) -> str | None:
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    return next((c for c in candidates if c in present), None)


def _why_unusable(row: dict, q_col: str, a_col: str) -> str:
    """Why a row gave no question or no answer (the reason a SkippedRow records)."""
    if _question_text(row.get(q_col)) is None:
        value = row.get(q_col)
        return (f"no question: column {q_col!r} is missing" if q_col not in row else
                f"no question: column {q_col!r} is empty or not text (a {type(value).__name__})")
    if a_col not in row or row[a_col] is None:
        return f"no answer: column {a_col!r} is missing"
    if a_col == "solution" and isinstance(row[a_col], str) and row[a_col].strip():
        return "no answer: the solution has no final answer (no '####' and no \\boxed{})"
    return f"no answer: column {a_col!r} is empty or not a string or integer (a {type(row[a_col]).__name__})"


def load_problems(path: str) -> tuple[list[Problem], list[SkippedRow]]:
    """Load `path` (.jsonl or .parquet).

    Args:
        path: the problem file.

    Returns:
        (problems, skipped rows: one `SkippedRow` per row that was not used, with its line and reason).

    Raises:
        ValueError: a missing file, an unknown extension, no recognisable columns, or no usable row.
    """
    if not os.path.isfile(path):
        raise ValueError(f"problem file does not exist: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"problem file must end in one of {EXTENSIONS}, got {path!r}")
    numbered, skipped = _read_jsonl(path) if ext == ".jsonl" else _read_parquet(path)
    unit = "line" if ext == ".jsonl" else "row"
    rows = [row for _, row in numbered]
    q_col, a_col = _detect(rows, QUESTION_COLUMNS), _detect(rows, ANSWER_COLUMNS)
    if rows and (q_col is None or a_col is None):
        found = sorted(set().union(*(row.keys() for row in rows)))
        raise ValueError(
            f"no question column ({'|'.join(QUESTION_COLUMNS)}) or no answer column "
            f"({'|'.join(ANSWER_COLUMNS)}) in {path!r}; columns found: {found}"
        )
    problems = []
    for number, row in numbered:
        assert q_col is not None and a_col is not None  # rows is not empty: both columns were found (above)
        question = _question_text(row.get(q_col))
        answer = reduce_answer(row.get(a_col), a_col)
        if question is None or answer is None:
            skipped.append(SkippedRow(number, _why_unusable(row, q_col, a_col), unit))
            continue
        problems.append(Problem(question=question, answer=answer))
    skipped.sort(key=lambda r: r.line)
    if not problems:
        first = "; ".join(str(r) for r in skipped[:LOG_FIRST])
        raise ValueError(f"no usable rows in {path!r} ({len(skipped)} rows skipped: {first})")
    return problems, skipped


@dataclass
class ProblemFile:
    """A problem file as a command read it: its problems and its skipped rows, and how to report them."""

    path: str
    flag: str  # the option that named it ("--data", "--eval-data"): every message starts with it
    problems: list[Problem]
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.problems) + len(self.skipped)

    @property
    def skipped_frac(self) -> float:
        return len(self.skipped) / self.n_rows if self.n_rows else 0.0

    def log_lines(self, first: int = LOG_FIRST) -> list[str]:
        """The log's report: the count, then the first `first` skipped rows with their reasons."""
        if not self.skipped:
            return []
        lines = [f"{self.flag} {self.path!r}: {len(self.skipped)} of {self.n_rows} rows skipped "
                 f"({100 * self.skipped_frac:.2f}%)"]
        lines += [f"  {self.flag} {r}" for r in self.skipped[:first]]
        if len(self.skipped) > first:
            lines.append(f"  ... and {len(self.skipped) - first} more")
        return lines

    def write_skipped(self, fh: IO[str]) -> None:
        """One jsonl row per skipped row: file, flag, line (or row), reason."""
        for r in self.skipped:
            fh.write(json.dumps({"file": self.path, "flag": self.flag, r.unit: r.line, "reason": r.reason}) + "\n")

    def check(self, max_skipped_frac: float, *, option: str = "--max-skipped-frac") -> None:
        """Raise ValueError when more than `max_skipped_frac` of the rows were skipped."""
        if self.skipped_frac > max_skipped_frac:
            first = "; ".join(str(r) for r in self.skipped[:LOG_FIRST])
            raise ValueError(f"{self.flag} {self.path!r}: {len(self.skipped)} of {self.n_rows} rows are unusable "
                             f"({100 * self.skipped_frac:.2f}%, more than {option} {max_skipped_frac}): {first}. "
                             f"Fix the file, or pass {option} {self.skipped_frac:.4f} (or higher) to accept them")


def load_problem_file(path: str, *, flag: str, max_skipped_frac: Optional[float] = None) -> ProblemFile:
    """`load_problems` as a command reads a file: errors name `flag`; with `max_skipped_frac`, past that
    share of skipped rows a ValueError (`ProblemFile.check`).

    Args:
        path: the problem file.
        flag: the option that named it, for messages ("--data").
        max_skipped_frac: the largest accepted share of skipped rows; None = no check here.

    Returns:
        The `ProblemFile`.

    Raises:
        ValueError: as `load_problems`, or past `max_skipped_frac`.
    """
    try:
        problems, skipped = load_problems(path)
    except ValueError as err:
        raise ValueError(f"{flag} {path!r}: {err}") from err
    data = ProblemFile(path=path, flag=flag, problems=problems, skipped=skipped)
    if max_skipped_frac is not None:
        data.check(max_skipped_frac)
    return data
