"""Paired comparisons over seeds: the mean paired difference, a bootstrap interval, a Wilcoxon test.

A sweep's arms share each seed's warm start, data order and first rollout, so arm A and arm B are
compared seed by seed: d_s = A_s - B_s over the n seeds both ran.

    mean difference   mean_s d_s
    bootstrap 95% CI  percentile interval of the mean of d over `n_boot` resamples of the seeds
                      with replacement (a fixed-seed RNG, so a rerun gives the same interval)
    Wilcoxon p        two-sided signed-rank test of "d is symmetric about 0": zeros dropped
                      (Wilcoxon's rule), tied |d| given their average rank, and the p-value from the
                      exact null distribution of W+ = sum of the ranks of positive d (every sign
                      pattern equally likely), enumerated by dynamic programming over the ranks. Exact
                      for any n and any ties; with 8 seeds the smallest possible p is 2 / 2^8 = 0.0078.

Standard library only (scipy is not a dependency).
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from lpreg.trainer.stats import bootstrap_ci  # the trainer's, shared (the trainer may not import this module)

__all__ = ["bootstrap_ci", "wilcoxon_signed_rank", "paired_difference", "paired_analysis", "paired_table",
           "PAIRED_METRICS"]

# the sweep's end-of-run values compared seed by seed (lpreg.trainer.summary.summarise keys)
PAIRED_METRICS = ("pass@8_last", "avg@8_last", "entropy_last", "spark_prob_last")


def _average_ranks(values: Sequence[float]) -> List[float]:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_signed_rank(differences: Sequence[float]) -> Tuple[float, float]:
    """(W+, two-sided exact p) for paired differences (module docstring). No non-zero difference:
    (0.0, 1.0)."""
    d = [float(x) for x in differences if x != 0]
    if any(math.isnan(x) for x in d):
        raise ValueError(f"differences must not hold NaN, got {list(differences)}")
    if not d:
        return 0.0, 1.0
    ranks = _average_ranks([abs(x) for x in d])
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    doubled = [int(round(2 * r)) for r in ranks]  # average ranks are multiples of 1/2
    counts = [0] * (sum(doubled) + 1)  # counts[s]: sign patterns whose doubled W+ is s
    counts[0] = 1
    for r in doubled:
        for s in range(len(counts) - 1, r - 1, -1):
            counts[s] += counts[s - r]
    total, w2 = 2 ** len(d), int(round(2 * w_plus))
    lower = sum(counts[: w2 + 1]) / total
    upper = sum(counts[w2:]) / total
    return w_plus, min(1.0, 2.0 * min(lower, upper))


def paired_difference(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]], *,
                      n_boot: int = 10_000) -> Optional[dict]:
    """a, b: {seed: value}. The seeds both hold a value for: per-seed d = a - b, their mean, the
    bootstrap 95% interval and the Wilcoxon p. None when no seed is shared."""
    seeds, d = [], []
    for s in sorted(a):
        x, y = a[s], b.get(s)
        if x is not None and y is not None and not math.isnan(x) and not math.isnan(y):
            seeds.append(s)
            d.append(x - y)
    if not seeds:
        return None
    lo, hi = bootstrap_ci(d, n_boot=n_boot)
    w_plus, p = wilcoxon_signed_rank(d)
    return {"n_seeds": len(seeds), "mean_difference": sum(d) / len(d), "ci95": [lo, hi], "wilcoxon_p": p,
            "wilcoxon_w_plus": w_plus, "seeds": seeds, "differences": d,
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}


def paired_analysis(runs: Dict[str, dict], reference: str, metrics: Sequence[str] = PAIRED_METRICS,
                    n_boot: int = 10_000) -> Dict[str, Dict[str, Optional[dict]]]:
    """runs: `compare.summarise_sweep`'s {arm: {"per_seed": {seed: summary}}}. For every arm other
    than `reference`: {metric: paired_difference(reference - arm)}."""
    if reference not in runs:
        raise ValueError(f"reference must be one of the sweep's arms {tuple(runs)}, got {reference!r}")

    def values(arm, metric):
        return {int(s): r.get(metric) for s, r in runs[arm]["per_seed"].items()}

    return {arm: {m: paired_difference(values(reference, m), values(arm, m), n_boot=n_boot) for m in metrics}
            for arm in runs if arm != reference}


def paired_table(paired: Dict[str, Dict[str, Optional[dict]]], reference: str,
                 labels: Optional[Dict[str, str]] = None) -> str:
    """`paired_analysis`'s result as a markdown table, one row per (other arm, metric); `labels`
    names the arms (default: their keys)."""
    labels = labels or {}
    lines = [f"| {labels.get(reference, reference)} minus | metric | mean paired difference | bootstrap 95% CI "
             "| Wilcoxon p | seeds (wins / losses) |", "|---|---|---|---|---|---|"]
    for arm, by_metric in paired.items():
        for metric, d in by_metric.items():
            if d is not None:
                lines.append(f"| {labels.get(arm, arm)} | {metric} | {d['mean_difference']:+.4f} | "
                             f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {d['wilcoxon_p']:.4f} | "
                             f"{d['n_seeds']} ({d['wins']} / {d['losses']}) |")
    return "\n".join(lines)
