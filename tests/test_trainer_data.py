"""load_problems: local .jsonl / .parquet problem sets, and every skipped row reported with its line and reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpreg.trainer.data import SkippedRow, load_problem_file, load_problems, reduce_answer
from lpreg.trainer.problem import Problem


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_gsm8k_answers_and_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "Big?", "answer": "lots of work\n#### 1,234"},
        "{not json",
        [1, 2],                               # valid JSON, not an object
        {"question": "", "answer": "#### 1"},  # empty question
        {"question": "No answer?"},            # missing answer
        {"question": 5, "answer": "#### 5"},   # non-string question
        {"question": "List?", "answer": ["1"]},  # non-string answer
        {"question": "Int answer?", "answer": 42},
        "",                                   # blank line: not a row, not counted
    ])
    problems, skipped = load_problems(path)
    assert problems == [
        Problem("Tom has 3 apples and buys 4. How many?", "7"),
        Problem("Big?", "1234"),
        Problem("Int answer?", "42"),
    ]
    # every skipped row by its line number and reason (nothing dropped silently)
    assert [(r.line, r.unit) for r in skipped] == [(3, "line"), (4, "line"), (5, "line"), (6, "line"), (7, "line"),
                                                   (8, "line")]
    reasons = [r.reason for r in skipped]
    assert reasons[0].startswith("invalid JSON") and reasons[1] == "not a JSON object (a list)"
    assert "no question" in reasons[2] and "no answer: column 'answer' is missing" == reasons[3]
    assert "no question" in reasons[4] and "no answer" in reasons[5] and "(a list)" in reasons[5]


def test_parquet_math_style_columns(tmp_path):
    table = pa.table({
        "problem": ["What is 1/2 + 0?", "Solve x+1=3.", "Unboxed?", None],
        "solution": ["Clearly $\\boxed{\\frac{1}{2}}$.", "So $x=\\boxed{2}$", "a long derivation", "\\boxed{4}"],
    })
    path = tmp_path / "math.parquet"
    pq.write_table(table, path)
    problems, skipped = load_problems(str(path))
    assert problems == [Problem("What is 1/2 + 0?", "\\frac{1}{2}"), Problem("Solve x+1=3.", "2")]
    # a solution without a final answer (row 3), a null problem (row 4): parquet rows are numbered from 1
    assert [(r.unit, r.line) for r in skipped] == [("row", 3), ("row", 4)]
    assert "no final answer" in skipped[0].reason and "no question" in skipped[1].reason


def test_column_priority_and_verl_format(tmp_path):
    # "answer" wins over "solution"; "question" over "prompt".
    path = write_jsonl(tmp_path / "both.jsonl", [
        {"question": "q1", "prompt": "p1", "answer": "5", "solution": "\\boxed{6}"},
    ])
    assert load_problems(path) == ([Problem("q1", "5")], [])
    table = pa.table({
        "prompt": [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]],
        "reward_model": [{"ground_truth": "4", "style": "rule"}],
    })
    pq.write_table(table, tmp_path / "verl.parquet")
    assert load_problems(str(tmp_path / "verl.parquet")) == ([Problem("2+2?", "4")], [])
    path = write_jsonl(tmp_path / "gt.jsonl", [{"prompt": "Say 3", "ground_truth": " 3 "}])
    assert load_problems(path) == ([Problem("Say 3", "3")], [])
    path = write_jsonl(tmp_path / "fa.jsonl", [{"problem": "Say 4", "final_answer": "4"}])
    assert load_problems(path) == ([Problem("Say 4", "4")], [])


def test_reduce_answer_rules():
    assert reduce_answer("#### -1,000.5") == "-1000.5"
    assert reduce_answer("x #### 72") == "72"
    assert reduce_answer("\\boxed{\\text{(A)}}", "solution") == "\\text{(A)}"
    assert reduce_answer("no box", "solution") is None
    assert reduce_answer("no box", "answer") == "no box"
    assert reduce_answer(True) is None and reduce_answer(None) is None and reduce_answer("  ") is None


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*missing.jsonl"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("question,answer\n1+1,2\n")
    with pytest.raises(ValueError, match="data.csv"):
        load_problems(str(tmp_path / "data.csv"))
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"question": "", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no usable rows.*bad.jsonl.*2 rows skipped: line 1: invalid JSON.*; "
                                         r"line 2: no question"):
        load_problems(bad)
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"text": "hi", "label": "1"}])
    with pytest.raises(ValueError, match=r"cols.jsonl.*columns found: \['label', 'text'\]"):
        load_problems(cols)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no usable rows.*empty.jsonl"):
        load_problems(str(empty))
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="corrupt.parquet"):
        load_problems(str(tmp_path / "corrupt.parquet"))


def test_problem_file_reports_each_skipped_row_and_stops_past_the_threshold(tmp_path):
    """The report every reader gives: the first few skipped rows in the log, all in the file it writes, and
    past --max-skipped-frac a ValueError naming the flag, the count and the way to accept them."""
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)] + ["{bad"] * 7
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_problem_file(path, flag="--data")
    assert len(data.problems) == 10 and data.n_rows == 17 and [r.line for r in data.skipped] == list(range(11, 18))
    log = data.log_lines()
    assert log[0].startswith(f"--data {path!r}: 7 of 17 rows skipped")
    assert log[1] == f"  --data {data.skipped[0]}" and log[1].startswith("  --data line 11: invalid JSON")
    assert len(log) == 1 + 5 + 1 and log[-1] == "  ... and 2 more"
    out = tmp_path / "skipped.jsonl"
    with open(out, "w") as fh:
        data.write_skipped(fh)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["line"] for w in written] == list(range(11, 18)) and all(w["file"] == path for w in written)
    with pytest.raises(ValueError, match=r"--data .*7 of 17 rows are unusable \(41.18%, more than --max-skipped-frac "
                                         r"0.01\): line 11: invalid JSON.*pass --max-skipped-frac 0.4118"):
        data.check(0.01)
    data.check(0.5)  # accepted when the user says so
    with pytest.raises(ValueError, match="more than --max-skipped-frac 0.4"):
        load_problem_file(path, flag="--data", max_skipped_frac=0.4)
    assert str(SkippedRow(3, "why", "row")) == "row 3: why"
