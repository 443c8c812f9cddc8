"""`lpreg.diagnose` / `lpreg-diagnose`: the figures computed by hand on a head with a known tail, the command
end to end on a tiny Hugging Face directory and on an lpreg-train checkpoint, the JSON, and each bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lpreg.diagnosis import cli
from lpreg.diagnosis import sample as sample_module
from lpreg.diagnosis.measure import measure_cell, split_calls, token_statistics
from lpreg.diagnosis.options import Settings
from lpreg.diagnosis.sample import Samples
from lpreg.diagnosis.verdict import verdict
from lpreg.trainer.model import build_tiny_model
from lpreg.trainer.tokenizer import build_char_tokenizer

# the known head: every position's next-token distribution is P, whatever the input
A, B, C, X = 10, 11, 12, 40  # X: a tail token
P_A, P_B, P_C = 0.5, 0.3, 0.15  # the rest, 0.05, spread evenly over the other 98 tokens


def _known_head_model():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    V = len(tok)
    p = torch.full((V,), 0.05 / (V - 3))
    p[A], p[B], p[C] = P_A, P_B, P_C
    fixed = p.log()
    model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: fixed.to(out.dtype).expand(*out.shape[:-1], V).clone())
    return model.eval(), tok, p


def _samples(responses, advantages, pad_id):
    n = len(responses)
    return Samples(questions=["q"] * n, prompt_ids=[[20, 21, 22]] * n, responses=responses,
                   texts=[""] * n, rewards=[0.0] * n, advantages=torch.tensor(advantages), group_size=n,
                   pad_id=pad_id)


def _measure(model, samples, tokens_per_call, kappa, rho, compat="released"):
    calls = split_calls([len(r) for r in samples.responses], tokens_per_call)
    tokens = token_statistics(model, samples, calls, thresholds=[kappa], mode="min_p", temperature=1.0,
                              backend="torch")
    return measure_cell(tokens, kappa, rho, compat=compat, beta=1.0)


# two negative-advantage responses (10 tokens), one positive: rho = 0.3 makes k = int(0.3 * 10) = 3, and the
# three rarest negative tokens are X (the tail) and the two C's of the first response (ties by position)
RESPONSES = [[X, C, A, B, C], [A, B, C, A, A], [A, A, C, B, A]]
ADVANTAGES = [-1.0, 1.0, -0.5]


def test_known_tail_gives_the_hand_computed_kept_mass_and_filtered_share():
    model, tok, _p = _known_head_model()
    samples = _samples(RESPONSES, ADVANTAGES, tok.pad_token_id)
    # kappa = 0.02 keeps p_i >= 0.01: K = {A, B, C}, m = 0.95; X is filtered
    cell, selected, kept = _measure(model, samples, 1000, 0.02, 0.3)
    m = P_A + P_B + P_C
    assert (cell.candidates, cell.filtered, cell.selected) == (3, 1, 2)
    assert cell.filtered_share == pytest.approx(1 / 3)
    assert cell.kept_mass == pytest.approx(m, rel=1e-5)
    assert cell.push == pytest.approx(1 / m - 1, rel=1e-4)
    assert cell.p_y == pytest.approx(P_C, rel=1e-5)
    assert cell.push_ratio == pytest.approx((1 / m - 1) / 1.0, rel=1e-4)  # both selected tokens have |A| = 1
    assert cell.selected_per_1000 == pytest.approx(1000 * 2 / 15)
    assert selected.nonzero().flatten().tolist() == [1, 4]  # the first response's two C's
    # kappa = 0.5 keeps p_i >= 0.25: K = {A, B}, m = 0.8; the three candidates are all filtered
    cell, _, _ = _measure(model, samples, 1000, 0.5, 0.3)
    assert (cell.candidates, cell.filtered, cell.selected, cell.kept_mass) == (3, 3, 0, None)
    line = verdict(cell, [cell], Settings(threshold=0.5, rho=0.3), frac_equal_groups=0.0)
    assert line.startswith("nothing selected: the lowest 30% (3 candidates) are all filtered as noise")


def test_known_tail_paper_form_and_the_k_rule_per_call():
    model, tok, _p = _known_head_model()
    samples = _samples(RESPONSES, ADVANTAGES, tok.pad_token_id)
    # paper form: k = int(0.2 * 15) = 3 of all tokens: X, C (first response), C (first response) -> A < 0 and kept
    cell, _, _ = _measure(model, samples, 1000, 0.02, 0.2, compat="paper")
    assert (cell.candidates, cell.filtered, cell.selected) == (3, 1, 2)
    m = P_A + P_B + P_C
    assert cell.push_ratio == pytest.approx(P_C * (1 / m - 1) / (1 - P_C), rel=1e-4)
    # released, one response per call: n_neg = 5 per negative call, k = int(0.3 * 5) = 1 -> nothing selected
    cell, _, _ = _measure(model, samples, 5, 0.02, 0.3)
    assert (cell.calls, cell.calls_selecting, cell.selected) == (3, 0, 0)
    line = verdict(cell, [cell], Settings(threshold=0.02, rho=0.3, tokens_per_call=5), frac_equal_groups=0.0)
    assert line.startswith("nothing selected: k = int(rho * n_neg) <= 1 in every call")


def test_selection_agrees_with_the_policy_loss():
    """The diagnosis' selected count is the loss's own (lpreg_policy_loss's lpreg_frac on the same logits)."""
    from lpreg import lpreg_policy_loss

    model, tok, p = _known_head_model()
    samples = _samples(RESPONSES, ADVANTAGES, tok.pad_token_id)
    cell, _, _ = _measure(model, samples, 1000, 0.02, 0.3)
    labels = torch.tensor([sum(RESPONSES, [])])
    logits = p.log().expand(1, labels.shape[1], -1).clone()
    adv = torch.tensor([[a for a, r in zip(ADVANTAGES, RESPONSES) for _ in r]])
    _loss, metrics = lpreg_policy_loss(logits, labels, adv, None, torch.ones_like(adv), rho=0.3, threshold=0.02,
                                       backend="torch")
    assert float(metrics["actor/lpreg_frac"]) * 15 == pytest.approx(cell.selected)


def test_split_calls_packs_consecutive_sequences():
    assert split_calls([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    with torch.no_grad():  # sharper than the flat random init: kept sets smaller than the vocabulary
        model.model.norm.weight.mul_(10.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{b}=?", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4), (5, 6)]))
    return root


SMALL = ["--samples", "4", "--max-new-tokens", "6", "--tokens-per-call", "40", "--kappas", "0.02,0.5",
         "--rhos", "0.1,0.5", "--rho", "0.5", "--backend", "torch", "--no-progress", "--device", "cpu"]


def _run_json(capsys, *argv):
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_command_end_to_end_on_a_hugging_face_directory(tiny_dir, capsys, tmp_path):
    heat = tmp_path / "grid.png"
    out = _run_json(capsys, str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *SMALL,
                    "--heatmap", str(heat))
    for key in ("verdict", "selected_per_1000", "filtered_share", "kept_mass", "push", "p_y", "push_ratio",
                "candidates", "selected", "examples", "grid", "settings", "response_tokens", "mean_reward"):
        assert key in out, key
    assert (out["prompts"], out["sequences"]) == (3, 12)
    assert out["settings"]["rho"] == 0.5 and out["settings"]["threshold"] == 0.02
    assert sorted((c["threshold"], c["rho"]) for c in out["grid"]) == [(0.02, 0.1), (0.02, 0.5), (0.5, 0.1),
                                                                       (0.5, 0.5)]
    assert 0 < out["response_tokens"] <= 12 * 6 and out["verdict"]
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the text report carries the same verdict
    assert cli.main([str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *SMALL]) == 0
    assert f"verdict: {out['verdict']}" in capsys.readouterr().out


def test_command_with_mixed_rewards_reports_the_selected_tokens(tiny_dir, capsys, monkeypatch):
    """A random tiny model solves nothing; with rewards alternating 1, 0 every group has negative-advantage
    responses, so the figures and the examples are exercised: they agree with each other."""
    monkeypatch.setattr(sample_module, "score", lambda texts, _answers, _reward:
                         [float(i % 2) for i in range(len(texts))])
    out = _run_json(capsys, str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *SMALL,
                    "--examples", "1000")
    assert out["negative_tokens"] > 0 and out["selected"] > 0
    assert len(out["examples"]) == out["selected"]
    ms = [e["kept_mass"] for e in out["examples"]]
    assert all(0 < m < 1 for m in ms)
    assert out["kept_mass"] == pytest.approx(sum(ms) / len(ms), rel=1e-5)
    assert out["push"] == pytest.approx(sum(1 / m - 1 for m in ms) / len(ms), rel=1e-4)
    assert all("[[" in e["context"] and e["advantage"] < 0 for e in out["examples"])
    assert out["verdict"].startswith("m = ")


def test_command_on_an_lpreg_train_checkpoint_matches_its_model(tiny_dir, capsys, tmp_path):
    from lpreg.trainer.checkpoint import save_checkpoint
    from lpreg.trainer.model import load_policy

    model, tok = load_policy(str(tiny_dir / "model"))
    opt = torch.optim.AdamW(model.parameters())
    step_dir = save_checkpoint(str(tmp_path / "run"), 3, model=model, tokenizer=tok, optimizer=opt, scheduler=None,
                               data_position=0, config={"seed": 0})
    direct = _run_json(capsys, str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *SMALL)
    for path in (step_dir, str(tmp_path / "run")):  # the checkpoint, and the run directory (its newest)
        via = _run_json(capsys, path, "--data", str(tiny_dir / "data.jsonl"), *SMALL)
        assert via["grid"] == direct["grid"] and via["verdict"] == direct["verdict"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv, message", [
    (["--kappa", "1.5"], "threshold (kappa) must be in (0, 1] for mode='min_p', got 1.5"),
    (["--kappa", "0.5", "--mode", "fixed", "--kappas", "0.9,1.0"], "thresholds (kappa) must be in (0, 1) for"),
    (["--rho", "0"], "rho must be in (0, 1], got 0.0"),
    (["--rhos", "0.1,2"], "rhos must be in (0, 1], got 2.0"),
    (["--samples", "1"], "samples must be an integer >= 2, got 1"),
    (["--tokens-per-call", "0"], "tokens_per_call must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused_naming_the_field(tiny_dir, capsys, argv, message):
    assert cli.main([str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_data_and_model_are_refused_naming_the_field(tiny_dir, tmp_path, capsys):
    import lpreg

    model = str(tiny_dir / "model")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "1+1=?", "answer": "2"}\n{"question": "2+2=?"}\n')
    with pytest.raises(ValueError, match="line 2"):
        lpreg.diagnose(model, data=str(missing), backend="torch")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"^data: no usable rows"):
        lpreg.diagnose(model, data=str(empty))
    with pytest.raises(ValueError, match="problems is empty"):
        lpreg.diagnose(model, problems=[])
    with pytest.raises(ValueError, match=r"problems\[1\]: the answer is missing"):
        lpreg.diagnose(model, problems=[("1+1=?", "2"), ("2+2=?", "")])
    with pytest.raises(ValueError, match="give exactly one of data"):
        lpreg.diagnose(model)
    bare = tmp_path / "no_tokenizer"
    build_tiny_model(build_char_tokenizer(), hidden_size=16, num_layers=1, num_heads=2).save_pretrained(bare)
    with pytest.raises(ValueError, match="has no tokenizer"):
        lpreg.diagnose(str(bare), problems=[("1+1=?", "2")])
    with pytest.raises(ValueError, match="is not a directory"):
        lpreg.diagnose(str(tmp_path / "nowhere"), problems=[("1+1=?", "2")])
    with pytest.raises(ValueError, match="neither a Hugging Face model"):
        lpreg.diagnose(str(tmp_path), problems=[("1+1=?", "2")])
    assert cli.main([str(bare), "--data", str(tiny_dir / "data.jsonl")]) == 2
    assert "lpreg-diagnose: error: model: " in capsys.readouterr().err


def test_import_lpreg_stays_light_and_diagnose_is_the_function():
    code = ("import sys, lpreg\n"
            "heavy = [m for m in ('transformers', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import lpreg.diagnosis.cli\n"
            "assert callable(lpreg.diagnose) and lpreg.diagnose.__name__ == 'diagnose'\n"
            "assert lpreg.diagnosis.__name__ == 'lpreg.diagnosis'  # the package: its own name\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_json_holds_no_nan(tiny_dir, capsys):
    out = _run_json(capsys, str(tiny_dir / "model"), "--data", str(tiny_dir / "data.jsonl"), *SMALL)
    text = json.dumps(out)
    assert "NaN" not in text and all(c["filtered_share"] is None or not math.isnan(c["filtered_share"])
                                     for c in out["grid"])


def test_a_checkpoints_output_transform_is_measured(tiny_dir, capsys, monkeypatch, tmp_path):
    """An lpreg-train checkpoint records its output transform (here a floor of 80% of the mass spread over the
    vocabulary) and the diagnosis loads it the trainer's way: the kept mass shows the floor."""
    import lpreg.experiments  # noqa: F401  (registers the study's output_floor transform)
    from lpreg.trainer.checkpoint import save_checkpoint
    from lpreg.trainer.model import load_policy
    from lpreg.trainer.output_transform import apply_output_transform

    monkeypatch.setattr(sample_module, "score", lambda texts, _answers, _reward: [float(i % 2)
                                                                                   for i in range(len(texts))])
    model, tok = load_policy(str(tiny_dir / "model"))
    apply_output_transform(model, "output_floor:floor=0.8")
    save_checkpoint(str(tmp_path / "run"), 1, model=model, tokenizer=tok, optimizer=torch.optim.AdamW(
        model.parameters()), scheduler=None, data_position=0, config={"seed": 0})
    # kappa = 1 keeps the argmax alone, so m = max p, which the floor caps at (1 - 0.8) + 0.8 / V; rho = 1 makes
    # every negative-advantage token a candidate
    # 16 samples a prompt: under the floor the argmax (the one kept token) is sampled about 1 time in 5, and a
    # selected token must be it; fewer samples can leave none on some torch versions' sampling streams
    argv = ["--data", str(tiny_dir / "data.jsonl"), *SMALL, "--examples", "1000", "--kappa", "1.0", "--rho", "1.0",
            "--samples", "16"]
    floored = _run_json(capsys, str(tmp_path / "run"), *argv)
    plain = _run_json(capsys, str(tiny_dir / "model"), *argv)
    cap = 0.2 + 0.8 / len(tok)
    assert floored["selected"] > 0 and max(e["kept_mass"] for e in floored["examples"]) <= cap + 1e-5
    assert max(e["kept_mass"] for e in plain["examples"]) > cap  # the same weights without the floor


def test_verdict_of_the_paper_form_names_the_full_kls_push():
    model, tok, _p = _known_head_model()
    cell, _, _ = _measure(model, _samples(RESPONSES, ADVANTAGES, tok.pad_token_id), 1000, 0.02, 0.2, compat="paper")
    line = verdict(cell, [cell], Settings(threshold=0.02, rho=0.2, compat="paper"), frac_equal_groups=0.0)
    assert line.startswith("m = 0.950: the full KL's push p_y (1/m - 1) (1/m - 1 = 0.0526) is ~")
    assert "Lp-Reg will barely act on this model" in line  # 0.15 * 0.0526 / 0.85 = 0.9% of the update
