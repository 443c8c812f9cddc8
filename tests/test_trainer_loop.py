"""The trainer loop's components (advantages, masks, rollout, config) and a CPU end-to-end run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lpreg.trainer.advantage import group_advantages
from lpreg.trainer.config import LOSSES, PRESETS, load_config, preset_config
from lpreg.trainer.rollout import generate_group, pack, response_lengths, rollout_seed

REQUIRED = ("step", "critic/score/mean", "actor/entropy", "actor/pg_loss", "actor/lpreg_frac", "actor/lpreg_kl",
            "actor/grad_norm", "response_length/mean", "reward/timeouts", "train/frac_reward_zero_std",
            "timing/rollout_s", "timing/update_s")


# --- advantages --------------------------------------------------------------------------------

def test_group_advantages_group_std():
    r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    adv, m = group_advantages(r, 4, std_scaling="group", eps=0.0)
    g = torch.tensor(r, dtype=torch.float64).view(2, 4)
    ref = (g - g.mean(1, keepdim=True)) / g.std(1, keepdim=True)
    torch.testing.assert_close(adv.double(), ref.reshape(-1), rtol=1e-6, atol=1e-6)
    assert m["train/frac_reward_zero_std"] == 0.0


def test_zero_std_groups_get_zero_advantage_and_are_counted():
    r = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    for scaling in ("group", "batch", "none"):
        adv, m = group_advantages(r, 2, std_scaling=scaling)
        assert adv[0] == adv[1] == 0 and adv[4] == adv[5] == 0 and adv[6] == adv[7] == 0
        assert adv[2] == -adv[3] and adv[3] > 0
        assert m["train/frac_reward_zero_std"] == 0.75


def test_batch_and_no_std_scaling():
    r = [1.0, 0.0, 1.0, 1.0]
    adv_b, _ = group_advantages(r, 2, std_scaling="batch", eps=0.0)
    assert adv_b[0].item() == pytest.approx(0.5 / torch.tensor(r).std().item())
    adv_n, _ = group_advantages(r, 2, std_scaling="none", eps=0.0)
    assert adv_n.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages([1.0, 0.0, 1.0], 2)


# --- masks when pad == eos -----------------------------------------------------------------------

def test_response_lengths_pad_equals_eos():
    eos = 2  # and pad is 2 too: the first eos belongs to the response, the rest is padding
    resp = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2], [5, 3, 6, 2, 2]])
    assert response_lengths(resp, [eos]).tolist() == [3, 5, 1, 4]
    # a second eos id (an instruct model's turn-end token) ends a completion too
    assert response_lengths(resp, [eos, 3]).tolist() == [3, 5, 1, 2]


def test_pack_aligns_labels_with_next_token_logits():
    b = pack([[10, 11], [12]], [[20, 2], [21, 22, 2]], pad_id=2)
    assert b.input_ids.tolist() == [[10, 11, 20, 2], [12, 21, 22, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert b.labels.tolist() == [[-100, 20, 2], [21, 22, 2]]
    assert b.loss_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    b = pack([[10, 11, 12]], [[2]], pad_id=0)
    assert b.loss_mask.tolist() == [[0, 0, 1]] and b.labels.tolist() == [[-100, -100, 2]]


# --- rollout -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from lpreg.trainer.model import build_tiny_model
    from lpreg.trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    return build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0), tok


def test_generate_group_is_seeded_and_ignores_the_models_generation_config(tiny):
    model, tok = tiny
    cfg = preset_config("test-micro", max_new_tokens=6)
    ids = tok.encode("Q: 1+2=?\nA: ", add_special_tokens=False)
    kw = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    a = generate_group(model, ids, 4, cfg, seed=rollout_seed(0, 3, 5), **kw)
    b = generate_group(model, ids, 4, cfg, seed=rollout_seed(0, 3, 5), **kw)
    c = generate_group(model, ids, 4, cfg, seed=rollout_seed(0, 3, 6), **kw)
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # a random model samples different completions
    saved = model.generation_config
    try:
        model.generation_config.top_k, model.generation_config.do_sample = 1, False  # would mean greedy
        model.generation_config.min_p = 0.5
        d = generate_group(model, ids, 4, cfg, seed=rollout_seed(0, 3, 5), **kw)
    finally:
        model.generation_config = saved
        saved.top_k, saved.do_sample, saved.min_p = None, None, None
    assert d == a
    assert model.generation_config is saved  # restored after generation
    for r in a:  # cut after the first eos, never longer than max_new_tokens
        assert len(r) <= 6 and (tok.eos_token_id not in r[:-1])


def test_rollout_seed_is_distinct():
    seeds = {rollout_seed(s, t, i) for s in range(3) for t in range(20) for i in range(-1, 30)}
    assert len(seeds) == 3 * 20 * 31


# --- config, CLI, YAML, errors -----------------------------------------------------------------

def test_presets_and_overrides(tmp_path):
    cfg = load_config(["--preset", "test-micro"])
    assert cfg.hidden_size == PRESETS["test-micro"]["hidden_size"] and cfg.preset == "test-micro"
    y = tmp_path / "c.yaml"
    y.write_text("preset: test-micro\nlr: 0.5\nsteps: 7\nloss: grpo\nplot: false\n")
    cfg = load_config(["--config", str(y), "--steps", "9", "--std_scaling", "batch"])
    assert (cfg.lr, cfg.steps, cfg.loss, cfg.std_scaling, cfg.plot) == (0.5, 9, "grpo", "batch", False)
    cfg = load_config(["--preset", "qwen2.5-math-1.5b", "--model", "/m", "--lr", "2e-6"])
    assert (cfg.lr, cfg.prompts_per_step, cfg.samples_per_prompt, cfg.model) == (2e-6, 256, 8, "/m")
    y.write_text("bogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        load_config(["--config", str(y)])


@pytest.mark.parametrize("argv, needle", [
    (["--loss", "ppo_magic"], "ppo_magic"),
    (["--preset", "gpu-huge"], "gpu-huge"),
    (["--std-scaling", "median"], "median"),
])
def test_bad_values_exit_naming_the_value(argv, needle):
    from lpreg.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert needle in str(exc.value) and "--" in str(exc.value)


def test_every_loss_is_a_valid_choice():
    for name in LOSSES:
        assert preset_config("test-micro", loss=name).loss == name


def _run(args, tmp_path, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "lpreg.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_missing_model_and_unusable_data_are_clear_errors(tmp_path):
    from lpreg.train import main

    missing = str(tmp_path / "no_such_model")
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "test-micro", "--model", missing, "--output-dir", str(tmp_path / "o1")])
    assert missing in str(exc.value) and "--model" in str(exc.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\nnot json at all\n{"question": null}\n')
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "test-micro", "--data", str(bad), "--output-dir", str(tmp_path / "o2")])
    assert str(bad) in str(exc.value) and "--data" in str(exc.value)


# --- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cpu_end_to_end_run_changes_parameters_and_writes_metrics(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    res = _run(["--preset", "test-micro", "--steps", "3", "--output-dir", str(out), "--resume", "none",
                "--plot", "true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(REQUIRED) <= set(r), set(REQUIRED) - set(r)
    assert any(r["critic/score/mean"] > 0 for r in rows), "the micro task gave no reward at all"
    assert all(r["response_length/mean"] > 0 for r in rows)
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_000001", "step_000002", "step_000003"]
    first = load_file(str(out / "checkpoints" / ckpts[0] / "model" / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / ckpts[-1] / "model" / "model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first), "RL steps left the parameters unchanged"
    assert (out / "training_curves.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"question", "answer", "completion", "reward"} <= set(samples[0])


@pytest.mark.slow
def test_off_policy_run_with_held_out_eval(tmp_path):
    """--mini-batches 2: the scoring pass runs (old log-probs and the rollout policy's sparse proxy),
    two optimizer steps per rollout; --eval-every 2 logs held-out avg@k / pass@k at steps 2 and 3."""
    out = tmp_path / "run"
    res = _run(["--preset", "test-micro", "--steps", "3", "--output-dir", str(out), "--resume", "none",
                "--mini-batches", "2", "--eval-every", "2", "--eval-problems", "3", "--eval-k", "2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/scoring_pass"] == 1 and r["train/updates_per_rollout"] == 2 for r in rows)
    assert "eval/pass@1" not in rows[0]
    for r in rows[1:]:  # every eval_every steps, and at the last step
        assert {"eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/maj@2"} <= set(r)
        assert 0.0 <= r["eval/pass@1"] <= r["eval/pass@2"] <= 1.0


def test_the_loop_fits_one_screen():
    """Issue 9: `train` reads top to bottom in one screen, and no trainer or experiment function runs long."""
    import ast
    import inspect

    import lpreg.train
    from lpreg.trainer.loop import train

    assert lpreg.train.train is train and len(inspect.getsource(train).splitlines()) <= 45
    root = os.path.dirname(lpreg.train.__file__)
    files = [os.path.join(root, "train.py")] + [os.path.join(root, pkg, f) for pkg in ("trainer", "experiments")
                                                for f in os.listdir(os.path.join(root, pkg)) if f.endswith(".py")]
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path}:{node.name} is {length} lines"


def test_end_of_run_summary_reads_the_logs(tmp_path):
    """What lpreg-train prints when a run ends (lpreg.trainer.summary)."""
    from lpreg.trainer.summary import format_summary, summarise

    rows = [{"step": 0, "eval/pass@8": 0.5, "eval/avg@8": 0.25}]
    rows += [{"step": s, "critic/score/mean": s / 20, "actor/entropy": 1.0 - s / 40,
              "actor/lpreg_frac": 0.0 if s == 3 else 0.1, "train/n_tokens": 200} for s in range(1, 21)]
    rows[-1].update({"eval/pass@8": 0.75, "eval/avg@8": 0.5})
    (tmp_path / "metrics.jsonl").write_text("")
    s = summarise(rows, window=10)
    assert s["steps"] == 20 and s["reward_first"] == pytest.approx(5.5 / 20)
    assert s["reward_last"] == pytest.approx(15.5 / 20)
    assert s["lpreg_selected_per_step"] == pytest.approx(19 * 20 / 20) and s["frac_steps_selecting"] == 0.95
    assert (s["pass@8_first"], s["pass@8_last"], s["eval_step_first"], s["eval_step_last"]) == (0.5, 0.75, 0, 20)
    text = format_summary(rows, str(tmp_path), figure="fig.png", extra_lines=["  an instrument's line"])
    assert "train reward         0.275 -> 0.775   (rose)" in text
    assert "held-out pass@8      0.500 -> 0.750   avg@8 0.250 -> 0.500   (step 0 -> step 20)" in text
    assert "19.0 tokens per step on average; on 95% of steps" in text
    assert text.splitlines()[-3:-1] == ["  an instrument's line", "  figure: fig.png"]  # after Lp-Reg's line
    assert "figure: fig.png" in text and str(tmp_path / "metrics.jsonl") in text


@pytest.mark.parametrize("flag, value, needle", [
    ("lpreg_rho", 2.0, "--lpreg-rho: rho must be in (0, 1], got 2.0"),
    ("lpreg_compat", "paperish", "--lpreg-compat: compat must be one of"),
    ("token_stats_backend", "gpu", "--token-stats-backend: backend must be one of"),
])
def test_lpreg_options_are_checked_by_the_config_before_any_work(flag, value, needle):
    """The package's LossConfig checks every --lpreg-* option when the config is built, not at the
    first step after a minutes-long warm start."""
    with pytest.raises(ValueError) as exc:
        preset_config("test-micro", **{flag: value})
    assert needle in str(exc.value)
