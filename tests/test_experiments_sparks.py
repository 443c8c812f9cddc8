"""The cpu-sparks preset (lpreg.experiments.sparks): its tokenizer's noise tail, the designed rate of
the rare valuable "check" token in the warm-start data, and two real steps of the preset that log
the sweep's metrics and in which Lp-Reg (released form) selects dozens of tokens.

The runs use the preset's task, tokenizer, model shape and warm-start path, shortened (30 SFT
steps, 8 prompts, 8 held-out problems) so that the file takes well under a minute on 2 cores.
"""

import json
import os

import pytest
import torch

from lpreg.experiments import sparks
from lpreg.trainer.config import preset_config
from lpreg.trainer.model import format_prompt
from lpreg.trainer.reward import extract_answer

SHORT = dict(steps=2, warmup_steps=30, warmup_eval_problems=8, prompts_per_step=8, eval_every=1, eval_problems=8,
             plot=False, progress=False, sample_every=0, resume="none")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return sparks.sparks_tokenizer()


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """metrics.jsonl rows of a 2-step Lp-Reg run of the preset (in-process: shares the tokenizer)."""
    from lpreg.train import train

    out = tmp_path_factory.mktemp("sparks")
    cfg = preset_config("cpu-sparks", **SHORT, output_dir=str(out / "run"), warm_start_cache=str(out / "cache"))
    train(cfg)
    with open(out / "run" / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh], out


def _answer_forms():
    """Every completion the task can reward: the bare answers and the scratch forms."""
    for p in sparks.sparks_split("train", 0) + sparks.sparks_split("test", 0):
        terms = tuple(int(x) for x in p.question.rsplit(": ", 1)[1][:-2].split("+"))
        yield p.answer
        yield sparks.scratch(terms)


def test_tokenizer_is_subword_with_a_noise_tail(tok):
    assert len(tok) == sparks.VOCAB_SIZE == 3000
    used = set()
    for text in _answer_forms():
        used.update(tok.encode(text, add_special_tokens=False))
    # The tail: tokens no answer ever uses (name pieces). Measured: 2,939 of 3,000 (61 make every
    # answer); 90% leaves room for a different BPE merge order without hiding a tokenizer that
    # splits names into characters.
    assert len(used) < 0.1 * len(tok), len(used)
    assert len(tok.encode(sparks.SPARK, add_special_tokens=False)) == 1
    # no information is lost: every prompt + target round-trips exactly (spaces included)
    for p in sparks.sparks_split("test", 0)[:200]:
        text = format_prompt(tok, p.question) + p.target
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_training_is_deterministic(tok):
    before = sparks._tokenizer_json()
    sparks._tokenizer_json.cache_clear()
    assert sparks._tokenizer_json() == before


def test_spark_token_rate_in_the_warm_start_data():
    train = sparks.sparks_split("train", 0)
    hard = [p for p in train if sparks.is_hard(p)]
    easy = [p for p in train if not sparks.is_hard(p)]
    with_spark = [p for p in hard if p.target.startswith(sparks.SPARK)]
    rate = len(with_spark) / len(hard)
    # binomial std at n ~ 2,550, p = 0.08 is 0.0054: 4 sigma
    assert abs(rate - sparks.SPARK_RATE_HARD) < 0.022, rate
    assert all(p.target == p.answer for p in easy)
    # the other hard items answer directly, and DIRECT_NOISE of those answers are guesses: off
    # by 1 or 2, never negative (binomial std at n ~ 2,350, p = 0.5 is 0.0103: 4 sigma)
    direct = [p for p in hard if not p.target.startswith(sparks.SPARK)]
    wrong = [p for p in direct if p.target != p.answer]
    assert abs(len(wrong) / len(direct) - sparks.DIRECT_NOISE) < 0.042, len(wrong) / len(direct)
    assert all(abs(int(p.target) - int(p.answer)) in (1, 2) and int(p.target) >= 0 for p in wrong)
    # the scratch form is a correct worked answer the reward reads ("Answer: X")
    assert all(extract_answer(p.target) == p.answer for p in with_spark)
    # the splits are disjoint by expression, not only by question
    expr = {p.question.rsplit(": ", 1)[1] for p in train}
    assert not expr & {p.question.rsplit(": ", 1)[1] for p in sparks.sparks_split("test", 0)}


def _expression(question: str) -> str:
    return question.rsplit(" ", 1)[1] if question.startswith(sparks.DRILL_PREFIX) else question.rsplit(": ", 1)[1]


def test_drills_teach_the_scratch_form_on_training_expressions_only():
    from lpreg.trainer.setup import load_task

    drills = sparks.warm_start_drills()
    train_hard = {_expression(p.question) for p in sparks.sparks_split("train", 0) if sparks.is_hard(p)}
    test = {_expression(p.question) for p in sparks.sparks_split("test", 0)}
    assert {_expression(p.question) for p in drills} == train_hard and len(drills) == len(train_hard)
    assert not train_hard & test
    for p in drills:
        terms = tuple(int(x) for x in _expression(p.question)[:-2].split("+"))
        assert p.target == sparks.scratch(terms) and extract_answer(p.target) == p.answer == str(sum(terms))
    # the warm start sees them; the RL set and the held-out split never do
    rl, warm, _ = load_task(preset_config("cpu-sparks"))
    assert set(drills) <= set(warm) and len(warm) == len(sparks.sparks_split("train", 0)) + len(drills)
    assert not any(p.question.startswith(sparks.DRILL_PREFIX) for p in rl + sparks.sparks_split("test", 0))


def test_warm_start_cache_key_covers_the_warm_start_data(monkeypatch, tmp_path):
    """A task whose warm-start data changes must not load an entry trained on the old data."""
    import dataclasses

    from lpreg.trainer import tasks
    from lpreg.trainer.setup import warm_start_cache_dir

    cfg = preset_config("cpu-sparks", warm_start_cache=str(tmp_path))
    before = warm_start_cache_dir(cfg)
    monkeypatch.setitem(tasks.TASKS, "sparks", dataclasses.replace(tasks.TASKS["sparks"], warm_start_extra=None))
    assert warm_start_cache_dir(cfg) != before


@pytest.mark.slow
def test_two_steps_log_the_sweep_metrics(two_steps):
    rows, out = two_steps
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 < r["spark/prob"] < 1.0  # the check token is reachable but not dominant
        assert 0.0 <= r["spark/usage"] <= 1.0
        assert 1.0 <= r["train/distinct_answers"] <= 8.0  # per group of 8 samples
        assert 0.0 <= r["train/frac_reward_zero_std"] <= 1.0
        assert 0.0 <= r["eval/avg@8"] <= r["eval/pass@8"] <= 1.0
        assert r["actor/entropy"] > 0.0
    # the warm start ran once and was cached: a second run of the same seed loads it
    cached = os.listdir(out / "cache")
    assert len(cached) == 1 and os.path.isfile(out / "cache" / cached[0] / "model.safetensors")


def _released_selection_oracle(logits, labels, mask, adv, cfg) -> int:
    """float64 from the raw logits: the released form's k = int(rho n_neg) lowest p_y among the A < 0
    tokens, of which those min-p keeps (p_y >= kappa max p) are selected (k <= 1: none)."""
    p = torch.softmax(logits.double() / cfg.temperature, -1)
    valid = (mask > 0) & (labels != -100)
    p_y = p.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kept = p_y >= cfg.lpreg_threshold * p.max(-1).values
    neg = valid & (adv < 0)
    k = int(cfg.lpreg_rho * int(neg.sum()))
    if k <= 1:
        return 0
    order = torch.argsort(p_y[neg], stable=True)[:k]
    return int(kept[neg][order].sum())


@pytest.mark.slow
def test_lpreg_released_selects_dozens_of_tokens_in_a_step(two_steps):
    """A real step of the preset (setup from the warm-start cache, rollout, scoring pass, update).
    A 30-step warm start scores ~0, so every group has zero reward std and no token has A < 0:
    the step's rewards are replaced by a half-correct pattern (the selection depends on the
    advantages only through their sign)."""
    from lpreg.trainer.advantage import group_advantages
    from lpreg.trainer.rollout import rollout
    from lpreg.trainer.scoring import scoring_pass
    from lpreg.trainer.setup import setup
    from lpreg.trainer.step import step_metrics
    from lpreg.trainer.update import update

    _, out = two_steps
    cfg = preset_config("cpu-sparks", **SHORT, output_dir=str(out / "step"), warm_start_cache=str(out / "cache"))
    run = setup(cfg)
    try:
        ro = rollout(run, 0)
        ro.seq_adv, _ = group_advantages([float(i % 2) for i in range(len(ro.responses))], cfg.samples_per_prompt)
        plan = scoring_pass(run, ro, 0)
        b = plan.batch
        with torch.no_grad():  # the logits the update's (on-policy) selection sees
            logits = run.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        want = _released_selection_oracle(logits, b.labels, b.loss_mask, plan.tok_adv, cfg)
        sums, norms = update(run, plan)
        row = step_metrics(run, 0, ro, plan, sums, norms, {})
    finally:
        run.close()
    selected = row["actor/lpreg_frac"] * row["train/n_tokens"]
    # one token of slack: a p_y tied with the k-th, or on the kappa boundary, in fp32 vs float64
    assert abs(selected - want) <= 1, (selected, want)
    # at rho = 0.25 over 8 prompts x 8 samples (n_neg ~ 100, k ~ 25) some are selected even from
    # this near-uniform policy, whose lowest-p samples are mostly filtered tail tokens; the
    # preset's 16 prompts from its 800-step warm start select dozens (docs/research/cpu_sparks_design.md)
    assert selected >= 3, (selected, want)


def test_sweep_arms_are_the_published_settings():
    from lpreg.experiments.compare import ARMS, arm_flags
    from lpreg.trainer.config import load_config

    assert set(ARMS) == {"grpo", "lpreg_released", "lpreg_paper", "entropy_bonus", "80_20", "clip_higher"}
    cfgs = {arm: load_config(["--preset", "cpu-sparks", *arm_flags(arm)]) for arm in ARMS}
    assert cfgs["lpreg_released"].lpreg_compat == "released" and cfgs["lpreg_paper"].lpreg_compat == "paper"
    assert cfgs["entropy_bonus"].entropy_coef == 0.002
    assert cfgs["clip_higher"].mini_batches == 8  # off-policy, as published (16 prompts / 8)
    assert all(cfgs[a].mini_batches == 1 for a in ARMS if a != "clip_higher")
    with pytest.raises(ValueError, match="arm must be one of"):
        arm_flags("ppo")


def test_sweep_summary_means_and_spreads_over_seeds():
    from lpreg.experiments.compare import summarise_sweep

    def rows(entropy, pass8):
        return [{"step": s + 1, "actor/entropy": entropy, "actor/lpreg_frac": 0.1, "train/n_tokens": 400,
                 **({"eval/pass@8": pass8} if s == 19 else {})} for s in range(20)]

    out = summarise_sweep({"grpo": {0: rows(1.0, 0.5), 1: rows(3.0, 0.7)}}, window=10)["grpo"]
    assert out["mean"]["entropy_last"] == pytest.approx(2.0)
    assert out["spread"]["entropy_last"] == pytest.approx(2 ** 0.5)  # sample std of {1, 3}
    assert out["mean"]["pass@8_last"] == pytest.approx(0.6)
    assert out["mean"]["lpreg_selected_per_step"] == pytest.approx(40.0)  # 0.1 x 400 tokens


def test_spark_value_probe_forces_the_spark_and_measures_both_paths():
    """`python -m lpreg.experiments.spark_value` (the design check of docs/research/cpu_sparks_design.md), on a
    5-step warm start: the forced path always starts with check; the numbers are probabilities."""
    from lpreg.experiments.spark_value import measure

    out = measure(["--warmup-steps", "5", "--warmup-eval-problems", "2"], n_items=4, k=2)
    assert out["held_out_hard_items"] == 4 and out["k"] == 2 and out["warmup_steps"] == 5
    assert out["forced_spark"]["spark_usage"] == 1.0
    assert 0.0 < out["p_spark"] < 1.0
    for path in ("direct", "forced_spark"):
        assert 0.0 <= out[path]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="--task must be 'sparks'"):
        measure(["--task", "arithmetic"])


def test_sweep_figure_has_a_panel_per_logged_metric_only(tmp_path):
    """cpu-tiny logs neither spark/prob nor held-out metrics: the figure leaves those panels out."""
    import matplotlib.image

    from lpreg.experiments.compare import BAND_KEYS
    from lpreg.trainer.logging_utils import plot_bands

    rows = [{"step": s, "critic/score/mean": 0.1 * s, "actor/entropy": 1.0 / s} for s in range(1, 21)]
    full = [{**r, **{key: 0.5 for key, _ in BAND_KEYS}} for r in rows]
    small = matplotlib.image.imread(plot_bands({"grpo": [rows, rows]}, str(tmp_path / "a.png"), keys=BAND_KEYS))
    big = matplotlib.image.imread(plot_bands({"grpo": [full]}, str(tmp_path / "b.png"), keys=BAND_KEYS))
    # two panels fit in one row of four, all eight need two rows: the figure is about half as tall
    assert small.shape[0] < 0.7 * big.shape[0], (small.shape, big.shape)


@pytest.mark.slow
def test_the_control_demo_preset_runs_two_steps_and_prints_its_summary(two_steps, capsys):
    """The earlier main job, `--preset cpu-sparks-demo` (the cpu-sparks task and warm start, shortened as above
    and served by the same warm-start cache entry): held-out evaluation before the first step and
    after the last, the mechanism probe, and the end-of-run summary."""
    from lpreg.train import train

    _, out = two_steps
    cfg = preset_config("cpu-sparks-demo", **{**SHORT, "eval_every": 2, "plot": True}, mechanism_every=2,
                        output_dir=str(out / "demo"), warm_start_cache=str(out / "cache"))
    train(cfg)
    rows = [json.loads(line) for line in open(out / "demo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/pass@8" in rows[0] and "eval/pass@8" in rows[2] and "eval/pass@8" not in rows[1]
    assert all("mechanism/n_selected" in r for r in rows[1:])  # the first step and every 2nd
    assert len(open(out / "demo" / "mechanism.jsonl").read().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "warm start: loaded" in printed  # the cached warm start of the cpu-sparks runs above
    for needle in ("summary (2 steps", "train reward", "entropy (nats/token)", "held-out pass@8", "(step 0 -> step 2)",
                   "p(spark)", "Lp-Reg selected", "training_curves.png", "metrics.jsonl"):
        assert needle in printed, needle
