"""lpreg.trainer.evaluate: pass@k, maj@k, evaluate() and the lpreg-eval command."""

import itertools
import json
import math
import re

import pytest

from lpreg.trainer.evaluate import evaluate, main, majority_correct, pass_at_k, run
from lpreg.trainer.model import build_tiny_model
from lpreg.trainer.reward import RewardWorker, extract_answer
from lpreg.trainer.tasks import arithmetic_problems
from lpreg.trainer.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def brute_force_pass_at_k(n, c, k):
    # Fraction of the k-subsets of n samples (the first c correct) holding a correct one.
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, 0, 1) == 0.0 and pass_at_k(n, n, 1) == 1.0


def test_pass_at_k_large_n_is_finite_and_exact():
    # math.comb of 1000 would overflow a float; the ratio must still be exact.
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert pass_at_k(1000, 10, 500) == pytest.approx(1 - math.comb(990, 500) / math.comb(1000, 500))
    assert pass_at_k(100, 3, 1) == pytest.approx(0.03)


@pytest.mark.parametrize("bad", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4.0, 2, 1)])
def test_pass_at_k_validates(bad):
    with pytest.raises(ValueError):
        pass_at_k(*bad)


def test_majority_vote():
    # "12" wins 3 votes to 2 although it is wrong; unparseable samples do not vote.
    assert majority_correct(["12", "Answer: 12", "\\boxed{12}", "13", "13", "??", "??", "??"],
                            [0, 0, 0, 1, 1, 0, 0, 0]) == 0.0
    assert majority_correct(["13", "12", "13"], [1, 0, 1]) == 1.0
    assert majority_correct(["12", "13"], [0, 1]) == 0.0  # tie: first seen wins
    assert majority_correct(["no", "none"], [0, 0]) == 0.0


def _integer_reward(text, gold):
    answer = extract_answer(text)
    return float(answer is not None and re.fullmatch(r"-?\d+", answer) is not None and int(answer) == int(gold))


def test_evaluate_smoke_on_tiny_model():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    problems = arithmetic_problems(6, seed=0, split="test")
    with RewardWorker(timeout_s=5.0) as worker:  # one worker for the three calls
        _check_evaluate(model, tok, problems, worker)


def _check_evaluate(model, tok, problems, worker):
    m = evaluate(model, tok, problems, k=4, temperature=1.0, greedy=False, max_new_tokens=4,
                 batch_size=16, seed=0, reward_worker=worker, return_records=True)
    assert {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4"} <= set(m)
    assert m["n_problems"] == 6 and m["n_samples"] == 4
    assert m["pass@1"] == pytest.approx(m["avg@4"])
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1.0
    assert 0 < m["mean_response_chars"] <= 4  # one char per token, special tokens removed
    records = m["records"]
    assert [r["question"] for r in records] == [p.question for p in problems]
    for r in records:
        assert len(r["completions"]) == 4
        # For integer answers math-verify must agree with plain integer comparison.
        assert r["rewards"] == [_integer_reward(c, r["answer"]) for c in r["completions"]]
    # Greedy: one sample per problem, deterministic.
    g1 = evaluate(model, tok, problems, k=4, temperature=1.0, greedy=True, max_new_tokens=4,
                  batch_size=16, seed=0, reward_worker=worker, return_records=True)
    g2 = evaluate(model, tok, problems, k=4, temperature=1.0, greedy=True, max_new_tokens=4,
                  batch_size=16, seed=1, reward_worker=worker, return_records=True)
    assert g1["n_samples"] == 1 and "pass@2" not in g1
    assert [r["completions"] for r in g1["records"]] == [r["completions"] for r in g2["records"]]


def test_lpreg_eval_command(tmp_path, capsys):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval.json"
    metrics = run(["--model", str(tmp_path / "m"), "--data", "builtin", "--n-problems", "5", "--k", "2",
                    "--temperature", "0.7", "--max-new-tokens", "4", "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and metrics["n_problems"] == 5 and metrics["n_samples"] == 2
    assert saved["settings"]["temperature"] == 0.7 and len(saved["records"]) == 5
    assert '"pass@2"' in capsys.readouterr().out
    # The console script passes main()'s return value to sys.exit: it must be 0, not a dict.
    assert main(["--model", str(tmp_path / "m"), "--n-problems", "2", "--greedy", "--max-new-tokens", "3"]) == 0
    with pytest.raises(SystemExit, match="lpreg-eval: error: .*does not exist"):  # one line, no traceback
        main(["--model", str(tmp_path / "nope"), "--data", "builtin", "--n-problems", "2"])
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--greedy", "--temperature", "0.5"])
