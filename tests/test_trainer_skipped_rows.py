"""Nothing a user gave is dropped silently (issue 28): lpreg-train and lpreg-eval report each skipped row of
a problem file with its line and reason (the first few in the log, all of them in skipped_rows.jsonl /
the --output JSON), and past --max-skipped-frac (default 1%) stop before training or evaluating."""

import json

import pytest

from lpreg.train import main as lpreg_train
from lpreg.trainer.evaluate import run as lpreg_eval
from lpreg.trainer.model import build_tiny_model
from lpreg.trainer.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def _data(tmp_path, good=20):
    """`good` usable rows, then an invalid JSON line and a row without an answer (lines good+1, good+2)."""
    lines = [json.dumps({"question": f"{i}+1=?", "answer": str(i + 1)}) for i in range(good)]
    lines += ['{"question": "2+2=?", "answer": ', json.dumps({"question": "3+3=?"})]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _train(tmp_path, data, *extra):
    out = tmp_path / "run"
    lpreg_train(["--preset", "test-micro", "--data", data, "--output-dir", str(out), "--steps", "1",
                 "--warmup-steps", "2", "--resume", "none", *extra])
    return out


def test_the_issues_file_stops_the_run_before_training_naming_each_row(tmp_path, capsys):
    """The issue's example: one good row, one invalid JSON line, one row without an answer."""
    data = _data(tmp_path, good=1)
    with pytest.raises(SystemExit) as exc:
        _train(tmp_path, data)
    message = str(exc.value)
    assert message.startswith("lpreg-train: error: --data") and "2 of 3 rows are unusable" in message
    assert "line 2: invalid JSON" in message and "line 3: no answer: column 'answer' is missing" in message
    assert "--max-skipped-frac" in message
    log = capsys.readouterr()
    assert "line 2: invalid JSON" in log.out + log.err
    out = tmp_path / "run"
    written = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(w["line"], w["flag"]) for w in written] == [(2, "--data"), (3, "--data")]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # nothing trained


def test_a_flag_accepts_more_and_the_run_lists_every_skipped_row(tmp_path, capsys):
    data = _data(tmp_path, good=20)  # 2 of 22 rows: 9%
    out = _train(tmp_path, data, "--max-skipped-frac", "0.1")
    log = capsys.readouterr()
    text = log.out + log.err
    assert f"--data {data!r}: 2 of 22 rows skipped (9.09%)" in text
    assert "--data line 21: invalid JSON" in text and "--data line 22: no answer" in text
    written = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [w["line"] for w in written] == [21, 22] and all(w["reason"] for w in written)
    assert (out / "metrics.jsonl").read_text().strip()  # it trained
    assert "skipped_rows.jsonl" in text.split("summary (")[-1]  # the summary lists the file with the logs


def test_lpreg_eval_reports_and_stops(tmp_path, capsys):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = _data(tmp_path, good=20)
    args = ["--model", str(tmp_path / "m"), "--data", data, "--k", "1", "--max-new-tokens", "2"]
    with pytest.raises(ValueError, match=r"--data .*2 of 22 rows are unusable.*line 21: invalid JSON"):
        lpreg_eval(args)
    capsys.readouterr()
    metrics = lpreg_eval([*args, "--max-skipped-frac", "0.2", "--output", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert f"lpreg-eval: --data {data!r}: 2 of 22 rows skipped" in err and "--data line 21: invalid JSON" in err
    assert metrics["skipped_rows"] == 2 and metrics["n_problems"] == 20
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [(s["line"], s["reason"][:12]) for s in saved["skipped"]] == [(21, "invalid JSON"), (22, "no answer: c")]
