"""Paired statistics the trainer reports: an interval for a mean paired difference, standard library only.

    paired_interval(before, after)   the mean of d_i = after_i - before_i over paired units (held-out
                                     problems), with a Student-t interval: mean +- t_{(1+level)/2, n-1} s / sqrt(n),
                                     s the sample standard deviation of d. The t quantile is found by
                                     bisection on the t distribution's CDF, computed from the regularised
                                     incomplete beta function (continued fraction), so no scipy.
    bootstrap_ci(values)             a percentile bootstrap interval of a mean (fixed-seed RNG), which the
                                     sweep's paired statistics over seeds use (lpreg.experiments.paired)

The unit of pairing is the caller's: for a held-out evaluation, one problem's accuracy (correct samples
/ k) at step 0 and at the end. Such an interval covers the problems drawn, under this run's randomness
(one seed): it says nothing about the spread between seeds, which only more seeds measure.
"""

import math
import random
from dataclasses import dataclass
from typing import Sequence, Tuple

__all__ = ["PairedInterval", "paired_interval", "t_quantile", "bootstrap_ci"]


@dataclass(frozen=True)
class PairedInterval:
    """The mean paired difference (after - before), its interval, and the number of pairs."""

    mean: float
    low: float
    high: float
    n: int
    level: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def _betacf(a: float, b: float, x: float) -> float:
    # Lentz's continued fraction of the incomplete beta function
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (p in (0, 1), df > 0)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_interval(before: Sequence[float], after: Sequence[float], *, level: float = 0.95) -> PairedInterval:
    """The mean of after_i - before_i and its Student-t interval (module docstring).

    Args:
        before: one value per unit (e.g. a held-out problem's accuracy at step 0).
        after: the same units' values afterwards, in the same order.
        level: the interval's coverage, in (0, 1).

    Returns:
        A `PairedInterval`; with fewer than 2 pairs, or no spread at all, low = high = mean.

    Raises:
        ValueError: different lengths, no pairs, a NaN, or a level outside (0, 1).
    """
    if len(before) != len(after):
        raise ValueError(f"before and after must pair up, got {len(before)} and {len(after)} values")
    if not before:
        raise ValueError("paired_interval needs at least one pair, got none")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = [float(a) - float(b) for b, a in zip(before, after)]
    if any(math.isnan(x) for x in d):
        raise ValueError("paired_interval: before / after hold NaN")
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return PairedInterval(mean, mean, mean, n, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, level)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, a fixed-seed
    RNG: a rerun gives the same interval).

    Raises:
        ValueError: no values, or a level outside (0, 1).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values must not be empty, got []")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int((1.0 - level) / 2 * (n_boot - 1))]  # int() rounds a non-negative value down
    hi = means[int(math.ceil((1.0 + level) / 2 * (n_boot - 1)))]
    return lo, hi
