"""The mechanism probes of a sweep (lpreg.experiments.mechanism), pooled over seeds, and their figure.

For every seed of an arm, `mechanism.jsonl` holds one row per probed step: p_y before, and r_1, r_0 =
p_y after / before one update with beta = 1 and with beta = 0, for each token the released form
selected. `pool` summarises them per probe step and over all (quantiles, share of tokens pushed
down), and compares the two updates across seeds (a seed's mean log r_1 - mean log r_0, with
`lpreg.experiments.paired`: the interval and the test are over seeds, not over tokens, which share a
seed's state). `plot_mechanism` draws the distributions.
"""

import math
from typing import Any, Dict, List

from lpreg.experiments.paired import paired_difference
from lpreg.trainer.logging_utils import pyplot, save_figure

__all__ = ["pool", "plot_mechanism"]


def _quantile(values: List[float], q: float) -> float:
    """The q-quantile of `values` (linear between order statistics); NaN when empty."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def pool(rows_by_seed: Dict[int, List[dict]]) -> dict:
    """The probes of a sweep arm, {seed: mechanism.jsonl rows}: per probe step and over all, the
    quantiles (10%, 50%, 90%) of r_1 and r_0 and the share of tokens each update pushed down; per
    seed, the mean over its selected tokens of log r_1 - log r_0, compared across seeds with
    `paired.paired_difference` (so the interval and the test are over seeds, not tokens)."""
    def describe(rows: List[dict]) -> dict:
        out: Dict[str, Any] = {"n_tokens": sum(len(r["p_before"]) for r in rows),
               "p_before_q50": _quantile([x for r in rows for x in r["p_before"]], 0.5),
               "kept_mass_q50": _quantile([x for r in rows for x in r.get("kept_mass", [])], 0.5)}
        for beta in ("beta1", "beta0"):
            ratios = [x for r in rows for x in r[f"ratio_{beta}"]]
            out[f"ratio_{beta}"] = {f"q{int(q * 100)}": _quantile(ratios, q) for q in (0.1, 0.5, 0.9)}
            out[f"frac_down_{beta}"] = sum(x < 1.0 for x in ratios) / len(ratios) if ratios else math.nan
        return out

    steps = sorted({r["step"] for rows in rows_by_seed.values() for r in rows})
    log_gap, log1, log0 = {}, {}, {}
    for seed, rows in rows_by_seed.items():
        pairs = [(math.log(a), math.log(b)) for r in rows for a, b in zip(r["ratio_beta1"], r["ratio_beta0"])]
        if pairs:
            log1[seed] = sum(a for a, _ in pairs) / len(pairs)
            log0[seed] = sum(b for _, b in pairs) / len(pairs)
            log_gap[seed] = log1[seed] - log0[seed]
    return {"all": describe([r for rows in rows_by_seed.values() for r in rows]),
            "per_step": {s: describe([r for rows in rows_by_seed.values() for r in rows if r["step"] == s])
                         for s in steps},
            "per_seed_mean_log_ratio": {"beta1": log1, "beta0": log0},
            "seeds_beta1_vs_beta0": paired_difference(log1, log0)}


def plot_mechanism(rows_by_seed: Dict[int, List[dict]], path: str, title: str = "") -> str:
    """Two panels: per probe step, the distribution (box: quartiles, whiskers: 5-95%) of
    log2(p_y after / before) over every seed's selected tokens under each update; and the
    histogram of the same pooled over steps. Writes a PNG at `path`; returns the path."""
    plt = pyplot()
    rows = [r for rs in rows_by_seed.values() for r in rs]
    steps = sorted({r["step"] for r in rows})
    series = {beta: [[math.log2(x) for r in rows if r["step"] == s for x in r[f"ratio_{beta}"]] for s in steps]
              for beta in ("beta1", "beta0")}
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=90)
    every = [x for v in series.values() for s in v for x in s]
    lo, hi = (min(every), max(every)) if every else (-1.0, 1.0)
    edges = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 40  # both series on the same bins
    for i, (beta, label, color) in enumerate((("beta1", "Lp-Reg, beta = 1", "C1"), ("beta0", "beta = 0", "C0"))):
        pos = [j * 3 + i for j in range(len(steps))]
        data = [v if v else [math.nan] for v in series[beta]]
        box = ax.boxplot(data, positions=pos, widths=0.8, whis=(5, 95), showfliers=False, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.5)
        pooled = [x for v in series[beta] for x in v]
        hist.hist(pooled, bins=edges, alpha=0.5, color=color, label=f"{label} (median {_quantile(pooled, 0.5):+.2f})")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xticks([j * 3 + 0.5 for j in range(len(steps))], [str(s) for s in steps])
    ax.set_xlabel("RL step probed")
    ax.set_ylabel("log2(p_y after / before)")
    ax.set_title("selected tokens, one update: Lp-Reg (orange) vs beta = 0 (blue)", fontsize=9)
    hist.axvline(0.0, color="k", linewidth=0.8)
    hist.set_xlabel("log2(p_y after / before), all probes")
    hist.legend(fontsize=8)
    for a in (ax, hist):
        a.grid(alpha=0.3)
    return save_figure(plt, fig, path, title)
