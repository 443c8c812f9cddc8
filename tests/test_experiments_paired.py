"""The sweep's paired statistics (lpreg.experiments.paired) against values worked out by hand, and the
sweep's report pieces (the paired table, the mechanism pooled over seeds and its figure)."""

import math

import pytest

from lpreg.experiments.paired import (
    bootstrap_ci,
    paired_analysis,
    paired_difference,
    paired_table,
    wilcoxon_signed_rank,
)


def test_wilcoxon_exact_p_values_worked_by_hand():
    # all 8 positive: W+ = 36, the largest of 2^8 equally likely sign patterns; two-sided p = 2/256
    assert wilcoxon_signed_rank([1, 2, 3, 4, 5, 6, 7, 8]) == (36.0, pytest.approx(2 / 256))
    # rank 2 negative: W+ = 34; patterns with W+ >= 34 have negative ranks summing to <= 2: {}, {1},
    # {2}, so p = 2 * 3/256
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5, 6, 7, 8]) == (34.0, pytest.approx(6 / 256))
    # W+ = 1 + 4 = 5, half the total 10: the centre of the null distribution, so p = 1
    assert wilcoxon_signed_rank([1, -2, -3, 4]) == (5.0, pytest.approx(1.0))
    # zeros are dropped (Wilcoxon's rule): the same as the 3 non-zero values, all positive: p = 2/8
    assert wilcoxon_signed_rank([0.0, 0.5, 0.1, 0.3]) == (6.0, pytest.approx(2 / 8))
    assert wilcoxon_signed_rank([0.0, 0.0]) == (0.0, 1.0)


def test_wilcoxon_ties_get_average_ranks():
    # |d| = 1, 1, 2: ranks 1.5, 1.5, 3; W+ = 1.5 + 3 = 4.5. Doubled ranks {3, 3, 6}: the 8 sign
    # patterns give doubled W+ = 0, 3, 3, 6, 6, 9, 9, 12; P(W+ >= 4.5) = 3/8 (9, 9, 12), so p = 2 * 3/8
    w, p = wilcoxon_signed_rank([1.0, -1.0, 2.0])
    assert w == 4.5 and p == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_signed_rank([1.0, float("nan")])


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean():
    d = [0.10, -0.02, 0.05, 0.08, 0.01, 0.12, -0.04, 0.06]
    lo, hi = bootstrap_ci(d)
    assert lo < sum(d) / len(d) < hi
    assert (lo, hi) == bootstrap_ci(d)  # a fixed-seed RNG
    # the mean of a resample lies between the smallest and largest value
    assert min(d) <= lo and hi <= max(d)
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(d, level=1.5)


def test_paired_difference_uses_the_shared_seeds_only():
    a = {0: 0.7, 1: 0.6, 2: 0.9, 3: None}
    b = {0: 0.5, 1: 0.6, 2: 0.8, 4: 0.1}
    d = paired_difference(a, b, n_boot=200)
    assert d["seeds"] == [0, 1, 2] and d["n_seeds"] == 3
    assert d["differences"] == pytest.approx([0.2, 0.0, 0.1])
    assert d["mean_difference"] == pytest.approx(0.1)
    assert (d["wins"], d["losses"]) == (2, 0)
    assert d["wilcoxon_p"] == pytest.approx(2 / 4)  # zero dropped, 2 positive of 2
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_paired_analysis_is_reference_minus_each_other_arm():
    runs = {"lpreg_released": {"per_seed": {0: {"pass@8_last": 0.7}, 1: {"pass@8_last": 0.8}}},
            "grpo": {"per_seed": {"0": {"pass@8_last": 0.6}, "1": {"pass@8_last": 0.5}}}}
    out = paired_analysis(runs, "lpreg_released", metrics=("pass@8_last",), n_boot=100)
    assert set(out) == {"grpo"}
    assert out["grpo"]["pass@8_last"]["mean_difference"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="reference must be one of"):
        paired_analysis(runs, "80_20")


def _probe_rows(seed):
    # two probe steps; under beta = 1 the selected tokens rise, under beta = 0 they fall
    return [{"step": s, "p_before": [0.01, 0.02], "ratio_beta1": [1.1 + seed / 100, 1.2],
             "ratio_beta0": [0.9, 0.8 - seed / 100]} for s in (1, 20)]


def test_mechanism_pooled_over_seeds(tmp_path):
    import matplotlib.image

    from lpreg.experiments.mechanism_report import plot_mechanism, pool

    by_seed = {s: _probe_rows(s) for s in range(4)}
    out = pool(by_seed)
    assert out["all"]["n_tokens"] == 16 and set(out["per_step"]) == {1, 20}
    assert out["all"]["frac_down_beta1"] == 0.0 and out["all"]["frac_down_beta0"] == 1.0
    assert out["all"]["ratio_beta0"]["q50"] < 1.0 < out["all"]["ratio_beta1"]["q50"]
    gap = out["seeds_beta1_vs_beta0"]
    assert gap["n_seeds"] == 4 and gap["wins"] == 4  # every seed: mean log r_1 > mean log r_0
    want = (math.log(1.1) + math.log(1.2)) / 2 - (math.log(0.9) + math.log(0.8)) / 2
    assert gap["differences"][0] == pytest.approx(want)
    image = matplotlib.image.imread(plot_mechanism(by_seed, str(tmp_path / "m.png")))
    assert image.shape[0] > 100 and image.shape[1] > 2 * image.shape[0]  # two panels side by side


def test_paired_table_has_a_row_per_arm_and_metric():
    d = paired_difference({0: 0.7, 1: 0.8}, {0: 0.6, 1: 0.5}, n_boot=100)
    table = paired_table({"grpo": {"pass@8_last": d, "avg@8_last": None}}, "lpreg_released",
                         {"lpreg_released": "Lp-Reg (released)", "grpo": "GRPO"})
    lines = table.splitlines()
    assert lines[0].startswith("| Lp-Reg (released) minus") and len(lines) == 3
    assert "| GRPO | pass@8_last | +0.2000 |" in lines[2] and "2 (2 / 0)" in lines[2]
