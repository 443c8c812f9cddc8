"""The noisy-sparks task (lpreg.experiments.noisy_sparks): its problem generator (a pool of thousands,
a held-out split disjoint by expression, deterministic in the seed), its registration (task, the
noisy-sparks-demo / cpu-sparks-demo / cpu-regime-sweep presets), the warm start's random-token noise, the
output floor (a registered output transform), the sweep's cache of the step-0 evaluation, and a 2-step run
of the noisy-sparks-demo preset.
"""

import json
import os
import random

import pytest
import torch

import lpreg.experiments  # noqa: F401  (registers the task and presets)
from lpreg.experiments import diversity, noisy_sparks, output_floor, sparks, token_noise
from lpreg.experiments.token_noise import TokenNoise
from lpreg.trainer.config import preset_config
from lpreg.trainer.reward import extract_answer
from lpreg.trainer.tasks import TASKS, WARM_START_AUGMENTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def test_the_pool_holds_thousands_and_the_held_out_split_is_disjoint_by_expression():
    train, test = noisy_sparks.noisy_split("train", 0), noisy_sparks.noisy_split("test", 0)
    assert len(train) > 7000 and len(test) > 1000, (len(train), len(test))
    assert len({p.question for p in train}) == len(train)  # distinct questions
    train_expr = {noisy_sparks.expression(p) for p in train}
    test_expr = {noisy_sparks.expression(p) for p in test}
    assert train_expr and test_expr and not train_expr & test_expr
    # the same expression rule as sparks: no held-out sum is drilled or trained on under any phrasing
    assert test_expr == {noisy_sparks.expression(p) for p in sparks.sparks_split("test", 0)}
    drilled = {p.question.rsplit(" ", 1)[1] for p in sparks.warm_start_drills()}
    assert not drilled & test_expr
    # every target is a correct worked form, a direct " X Answer: X", or (half the direct hard ones) a guess
    for p in train + test:
        if not p.target.startswith(sparks.SPARK):
            said = p.target.split()[0]
            assert p.target == f" {said} {noisy_sparks.ANSWER} {said}", p
        got = extract_answer(p.target)
        assert got == p.answer or (sparks.is_hard(p) and abs(int(got) - int(p.answer)) in (1, 2)), p


def test_the_generator_is_deterministic_in_the_seed():
    a, b = noisy_sparks.noisy_split("train", 3), noisy_sparks.noisy_split("train", 3)
    assert a == b
    c = noisy_sparks.noisy_split("train", 4)
    assert a != c and sorted(p.question for p in a) == sorted(p.question for p in c)  # a reorder of one pool
    noisy_sparks.universe.cache_clear()
    assert noisy_sparks.noisy_split("train", 3) == a  # the pool itself is seed-free
    # two hard items to one easy at the front
    assert [sparks.is_hard(p) for p in a[:6]] == [True, True, False] * 2
    with pytest.raises(ValueError, match="split must be"):
        noisy_sparks.noisy_split("valid", 0)


def test_registration_and_presets():
    task = TASKS["noisy-sparks"]
    assert task.split_problems is noisy_sparks.noisy_split and diversity.SPARK_TOKENS["noisy-sparks"] == (sparks.SPARK,)
    assert WARM_START_AUGMENTS["noisy-sparks"].key == {"warm_start_noise": {"rate": noisy_sparks.NOISE.rate,
                                                                             "keep_last": noisy_sparks.NOISE.keep_last}}
    assert 0.2 <= noisy_sparks.NOISE.rate < 1 and noisy_sparks.FLOOR >= 0.2
    demo = preset_config("noisy-sparks-demo")
    assert demo.output_transform == f"output_floor:floor={noisy_sparks.FLOOR}"  # the floor is the presets' setting
    # the method's knobs stay at the paper's values except rho (the small batch: the preset says why)
    assert demo.task == "noisy-sparks" and demo.lpreg_threshold == 0.02 and demo.lpreg_beta == 1.0
    assert demo.lpreg_mode == "min_p" and demo.lpreg_compat == "released" and demo.loss == "lpreg"
    assert demo.eval_start and demo.option("mechanism_every") > 0
    assert demo.n_problems >= len(noisy_sparks.noisy_split("train", 0))
    control = preset_config("cpu-sparks-demo")
    assert control.task == "sparks" and control.n_problems == 96 and control.option("mechanism_every") == 30
    sweep = preset_config("cpu-regime-sweep")
    assert sweep.task == "noisy-sparks" and sweep.eval_problems == 384 and sweep.option("mechanism_every") == 0
    for field in ("lr", "lpreg_rho", "warmup_steps", "prompts_per_step", "max_new_tokens", "steps",
                  "output_transform"):
        assert getattr(sweep, field) == getattr(demo, field), field


def test_warm_start_noise_inserts_random_tokens_and_keeps_the_answer():
    from lpreg.trainer.model import _sft_batch

    tok = sparks.sparks_tokenizer()
    probs = noisy_sparks.noisy_split("train", 0)[:400]
    clean = _sft_batch(tok, probs, "cpu")
    noisy = _sft_batch(tok, probs, "cpu", token_noise.augment(TokenNoise(rate=0.3, keep_last=1), tok), random.Random(0))
    n_clean = int((clean[2] != -100).sum())
    n_noisy = int((noisy[2] != -100).sum())
    free = n_clean - 2 * len(probs)  # answer tokens that may get a token inserted before them (not eos, not last)
    assert abs((n_noisy - n_clean) / free - 0.3) < 0.05, (n_noisy - n_clean) / free
    specials = set(tok.all_special_ids)
    for row_c, row_n in zip(clean[2], noisy[2]):
        c = [t for t in row_c.tolist() if t != -100]
        n = [t for t in row_n.tolist() if t != -100]
        assert n[-2:] == c[-2:]  # the final answer token (keep_last = 1) and eos are never touched
        it = iter(n)  # the clean target is a subsequence of the noisy one
        assert all(any(t == u for u in it) for t in c)
        assert not (set(n) - set(c)) & specials
    # the same rng seed gives the same noise
    again = _sft_batch(tok, probs, "cpu", token_noise.augment(TokenNoise(rate=0.3, keep_last=1), tok), random.Random(0))
    assert torch.equal(again[0], noisy[0])
    with pytest.raises(ValueError, match="TokenNoise"):
        TokenNoise(rate=1.0)


def test_output_floor_is_a_tail_training_cannot_remove():
    from lpreg.trainer.setup import build_policy

    model, tok = build_policy(preset_config("noisy-sparks-demo"), "cpu")
    assert model.config.lpreg_output_transform == {"name": "output_floor", "module": "lpreg.experiments.output_floor",
                                                   "params": {"floor": noisy_sparks.FLOOR}}
    ids = torch.tensor([tok.encode("Q: Kobera packs nuts: 3+5+7=?\nA: ", add_special_tokens=False)])
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)  # a very sharp policy: softmax(z) ~ one-hot
        logp = model(input_ids=ids).logits[0, -1]
    p = logp.exp()
    assert abs(float(p.sum()) - 1.0) < 1e-5
    assert float(p.min()) >= noisy_sparks.FLOOR / len(tok) * (1 - 1e-4)  # every token keeps floor / V
    # min-p at kappa 0.02 keeps at most the top token(s) here: the kept mass is at most 1 - floor + a little
    kept = p[p >= 0.02 * p.max()].sum()
    assert float(kept) <= 1.0 - noisy_sparks.FLOOR + 0.02, float(kept)
    with pytest.raises(ValueError, match="floor"):
        output_floor.install(model, 1.0)


def test_warm_start_cache_key_covers_the_noise(monkeypatch, tmp_path):
    import dataclasses

    from lpreg.trainer import tasks
    from lpreg.trainer.setup import warm_start_cache_dir

    cfg = preset_config("noisy-sparks-demo", warm_start_cache=str(tmp_path))
    before = warm_start_cache_dir(cfg)
    augment = tasks.WARM_START_AUGMENTS["noisy-sparks"]
    monkeypatch.setitem(tasks.WARM_START_AUGMENTS, "noisy-sparks",
                        dataclasses.replace(augment, key={"warm_start_noise": {"rate": 0.1, "keep_last": 0}}))
    assert warm_start_cache_dir(cfg) != before
    monkeypatch.undo()
    assert warm_start_cache_dir(cfg) == before
    assert warm_start_cache_dir(dataclasses.replace(cfg, output_transform=output_floor.spec(0.1))) not in (before, None)


def test_eval_start_cache_key():
    from lpreg.trainer.eval_cache import eval_start_cache_file

    cfg = preset_config("cpu-regime-sweep", warm_start_cache="/c/ws", eval_start_cache="/c/ev", torch_threads=1)
    path = eval_start_cache_file(cfg)
    assert path.startswith("/c/ev/") and path.endswith(".json")
    # the arms of one seed share it; another seed or another evaluation does not
    assert eval_start_cache_file(preset_config("cpu-regime-sweep", warm_start_cache="/c/ws", eval_start_cache="/c/ev",
                                               torch_threads=1, loss="grpo")) == path
    for change in (dict(seed=1), dict(eval_problems=64), dict(warmup_steps=10), dict(max_new_tokens=8)):
        other = preset_config("cpu-regime-sweep", warm_start_cache="/c/ws", eval_start_cache="/c/ev", torch_threads=1,
                              **change)
        assert eval_start_cache_file(other) != path, change
    no_ws = preset_config("cpu-regime-sweep", eval_start_cache="/c/ev")
    assert eval_start_cache_file(no_ws) is None  # no warm-start key: nothing identifies the starting weights


SHORT = dict(steps=2, warmup_steps=30, warmup_eval_problems=8, prompts_per_step=8, eval_every=2, eval_problems=8,
             mechanism_every=1, plot=False, progress=False, sample_every=0, resume="none")


@pytest.mark.slow
def test_two_steps_of_noisy_sparks_demo_and_the_cached_start_evaluation(tmp_path, capsys):
    """Two real steps of the study's former main job (shortened warm start): the metrics and mechanism logs
    the issue's criteria read, the summary's mechanism lines, and a second run (another loss) that
    loads the step-0 evaluation instead of redoing it."""
    from lpreg.train import train

    caches = dict(warm_start_cache=str(tmp_path / "ws"), eval_start_cache=str(tmp_path / "ev"))
    train(preset_config("noisy-sparks-demo", **SHORT, **caches, output_dir=str(tmp_path / "a")))
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[0]["eval/avg@8"] <= rows[0]["eval/pass@8"] <= 1.0 and "eval/avg@8" in rows[-1]
    for r in rows[1:]:  # a 30-step warm start scores ~0: few or no negative advantages, so no numbers asserted
        assert "mechanism/n_selected" in r and "actor/lpreg_frac" in r and 0.0 <= r["spark/prob"] < 1.0
    probes = [json.loads(line) for line in open(tmp_path / "a" / "mechanism.jsonl")]
    assert [p["step"] for p in probes] == [1, 2]
    assert "summary (2 steps" in out and "held-out pass@8" in out
    ev = os.listdir(tmp_path / "ev")
    assert len(ev) == 1
    train(preset_config("noisy-sparks-demo", **{**SHORT, "mechanism_every": 0}, **caches, loss="grpo",
                        output_dir=str(tmp_path / "b")))
    assert "loaded " + str(tmp_path / "ev" / ev[0]) in capsys.readouterr().out
    first = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")][0]
    assert first == rows[0]


@pytest.mark.slow
def test_the_proxy_removes_a_quarter_of_the_mass_where_lpreg_selects(tmp_path):
    """One real step of noisy-sparks-demo's set-up (shortened warm start) with a half-correct reward pattern (the
    selection depends on the advantages only through their sign), measured by the mechanism probe:
    Lp-Reg selects tokens, and the proxy's kept mass at them is at most 0.8 (the floor's 0.25 is below
    min-p's cut), so k3 pushes with 1/m - 1 >= 0.25."""
    from lpreg.experiments.mechanism import probe
    from lpreg.trainer.advantage import group_advantages
    from lpreg.trainer.rollout import rollout
    from lpreg.trainer.scoring import scoring_pass
    from lpreg.trainer.setup import setup

    cfg = preset_config("noisy-sparks-demo", **{**SHORT, "eval_every": 0, "eval_start": False},
                        output_dir=str(tmp_path / "r"), warm_start_cache=str(tmp_path / "ws"))
    run = setup(cfg)
    try:
        ro = rollout(run, 0)
        ro.seq_adv, _ = group_advantages([float(i % 2) for i in range(len(ro.responses))], cfg.samples_per_prompt)
        out = probe(run, scoring_pass(run, ro, 0), 0)
    finally:
        run.close()
    assert out["mechanism/n_selected"] >= 5, out
    assert out["mechanism/kept_mass_median"] <= 0.8, out
