"""The end-of-run summary (issue 28): held-out accuracy with a paired interval over problems and their
number, whether train reward rose, Lp-Reg's share of selecting steps, every departure from the paper from
the config, and no credit to Lp-Reg for what RL learned. And the interval's statistics themselves."""

import math
import random

import pytest

from lpreg.trainer.config import preset_config
from lpreg.trainer.stats import bootstrap_ci, paired_interval, t_quantile
from lpreg.trainer.summary import departures, format_summary, held_out_interval


@pytest.mark.parametrize("p, df, want", [(0.975, 1, 12.706204736), (0.975, 10, 2.228138852), (0.95, 5, 2.015048373),
                                         (0.975, 255, 1.969310570), (0.975, 1e7, 1.959963985), (0.5, 3, 0.0)])
def test_t_quantile_matches_the_tables(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=1e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-want, abs=1e-6)


def test_paired_interval():
    ci = paired_interval([0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0])
    d = [1.0, 1.0, 0.0, 0.0]
    half = t_quantile(0.975, 3) * math.sqrt(sum((x - 0.5) ** 2 for x in d) / 3) / 2
    assert (ci.mean, ci.n) == (0.5, 4) and ci.low == pytest.approx(0.5 - half) and ci.high == pytest.approx(0.5 + half)
    assert not ci.excludes_zero()
    # pairing matters: the same values shuffled between pairs give a wider interval than a shift of 0.1 each
    rng = random.Random(0)
    before = [rng.random() for _ in range(300)]
    shifted = paired_interval(before, [b + 0.1 for b in before])
    assert shifted.low == pytest.approx(0.1) and shifted.high == pytest.approx(0.1) and shifted.excludes_zero()
    with pytest.raises(ValueError, match="pair up"):
        paired_interval([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_interval([float("nan")], [1.0])
    with pytest.raises(ValueError, match="level"):
        paired_interval([1.0], [1.0], level=1.0)
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], n_boot=2000)
    assert 1.0 <= lo < 2.5 < hi <= 4.0


def test_departures_come_from_the_config():
    paper = preset_config("qwen2.5-math-1.5b", model="/models/q", data="train.jsonl", lpreg_compat="paper")
    assert departures(paper) == ["policy: /models/q (the paper: Qwen2.5-Math-1.5B / 7B)"]
    tiny = preset_config("test-micro", lpreg_rho=0.5, lpreg_threshold=0.05, output_transform="x:y=1")
    found = "\n".join(departures(tiny))
    for needle in ("policy: a tiny model built in code (2 layers x 32 wide), warm-started by 40 SFT steps",
                   "task: the built-in task 'arithmetic'", "output transform 'x:y=1'", "rho: 0.5 (the paper: 0.01)",
                   "kappa (min-p): 0.05 (the paper: 0.02)", "group size: 4 (the paper: 8)",
                   "prompts per step: 2 (the paper: 256)", "RL steps: 3 (the paper: 500)",
                   "learning rate: 0.001 (the paper: 1e-06)", "Lp-Reg form: released (the authors' released code"):
        assert needle in found, needle
    assert "beta" not in found  # beta 1 is the paper's
    assert not any("rho" in d for d in departures(preset_config("test-micro", loss="grpo", lpreg_rho=0.5)))


def _run_rows(reward_first, reward_last, selecting=20):
    rows = [{"step": 0, "eval/avg@4": 0.25}]
    rows += [{"step": s, "critic/score/mean": reward_first if s <= 10 else reward_last, "actor/entropy": 1.0,
              "actor/lpreg_frac": 0.1 if s <= selecting else 0.0, "train/n_tokens": 100} for s in range(1, 21)]
    rows[-1]["eval/avg@4"] = 0.5
    return rows


def test_the_summary_reports_the_paired_interval_and_does_not_credit_lpreg(tmp_path):
    rng = random.Random(1)
    first = [rng.randrange(5) for _ in range(300)]
    last = [min(4, c + (rng.random() < 0.5)) for c in first]  # RL helped: every change is up
    held_out = [{"step": 0, "k": 4, "correct": first}, {"step": 20, "k": 4, "correct": last}]
    cfg = preset_config("test-micro", steps=20, lpreg_rho=0.5)
    text = format_summary(_run_rows(0.1, 0.3, selecting=18), str(tmp_path), cfg=cfg, held_out=held_out)
    _, _, ci = held_out_interval(held_out)
    assert ci.n == 300 and ci.low > 0
    assert (f"held-out avg@4       {sum(first) / 1200:.3f} (step 0) -> {sum(last) / 1200:.3f} (step 20): "
            f"{ci.mean:+.3f}, paired 95% interval [{ci.low:+.3f}, {ci.high:+.3f}] over 300 held-out problems") in text
    assert "the end is above the start for these problems under this seed" in text
    assert "leaves out the spread between seeds" in text
    assert "train reward         0.100 -> 0.300   (rose)" in text
    assert "on 90% of steps" in text
    assert "rho: 0.5 (the paper: 0.01)" in text and "departures from the paper's recipe" in text
    assert "It does not separate Lp-Reg's part from GRPO's" in text and "--loss grpo on the same seeds" in text
    flat = format_summary(_run_rows(0.3, 0.3), str(tmp_path), cfg=cfg,
                          held_out=[held_out[0], {"step": 20, "k": 4, "correct": first}])
    assert "(did not rise)" in flat and "not distinguishable from the start" in flat
    grpo = format_summary(_run_rows(0.3, 0.3), str(tmp_path), cfg=preset_config("test-micro", loss="grpo"))
    assert "Lp-Reg selected" not in grpo  # a GRPO run claims nothing about Lp-Reg
