"""Local problem sets: .jsonl and .parquet files of question/answer rows.

    problems, skipped = load_problems("gsm8k_test.jsonl")

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

Rows that cannot be used are skipped and counted, never fatal: malformed JSON lines,
lines that are not objects, missing or empty question/answer, a question that is not a
string, an answer that is not a string or an integer. `ValueError`, naming the file, for
a path that does not exist, an unknown extension, no recognisable columns, or no usable
row at all.
"""

from __future__ import annotations

import json
import os
import re

from lpreg.trainer.problem import Problem
from lpreg.trainer.reward import last_boxed

QUESTION_COLUMNS = ("question", "problem", "prompt")
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "final_answer", "reward_model")
EXTENSIONS = (".jsonl", ".parquet")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def _read_jsonl(path: str) -> tuple[list[dict], int]:
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def _read_parquet(path: str) -> tuple[list[dict], int]:
    try:  # imported here: pyarrow is optional (the "train" extra) and only parquet files need it
        import pyarrow.parquet as pq
    except ImportError as err:  # pyarrow is in the "train" extra
        raise ValueError(f"reading {path!r} needs pyarrow (pip install 'lpreg[train]')") from err
    try:
        return pq.read_table(path).to_pylist(), 0
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


def load_problems(path: str) -> tuple[list[Problem], int]:
    """Load `path` (.jsonl or .parquet); returns `(problems, number of rows skipped)`."""
    if not os.path.isfile(path):
        raise ValueError(f"problem file does not exist: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ValueError(f"problem file must end in one of {EXTENSIONS}, got {path!r}")
    rows, skipped = _read_jsonl(path) if ext == ".jsonl" else _read_parquet(path)
    q_col, a_col = _detect(rows, QUESTION_COLUMNS), _detect(rows, ANSWER_COLUMNS)
    if rows and (q_col is None or a_col is None):
        found = sorted(set().union(*(row.keys() for row in rows)))
        raise ValueError(
            f"no question column ({'|'.join(QUESTION_COLUMNS)}) or no answer column "
            f"({'|'.join(ANSWER_COLUMNS)}) in {path!r}; columns found: {found}"
        )
    problems = []
    for row in rows:
        assert a_col is not None  # rows is not empty: both columns were found (checked above)
        question = _question_text(row.get(q_col))
        answer = reduce_answer(row.get(a_col), a_col)
        if question is None or answer is None:
            skipped += 1
            continue
        problems.append(Problem(question=question, answer=answer))
    if not problems:
        raise ValueError(f"no usable rows in {path!r} ({skipped} rows skipped)")
    return problems, skipped
