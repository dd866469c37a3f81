"""Small-sample statistics for replicated runs: a mean with its t-interval, and the difference of
two means (Welch's unequal-variance interval, or the paired interval when both sides ran the same
seeds). Seeds are few (3–5), so every interval uses Student's t, never a normal approximation.

Pure functions over lists of floats; `compare`, the results table and the sweep plots share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom."""
    from scipy import stats  # imported on use: it costs every command ~1.5 s at start-up

    return float(stats.t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean over replicates and its two-sided t-interval (None when n < 2: one value has no spread)."""

    mean: float
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


@dataclass(frozen=True)
class Difference:
    """`a − b` with its interval; `method` is "welch" or "paired", `df` the t degrees of freedom."""

    estimate: float
    low: float | None
    high: float | None
    df: float | None
    method: str
    n_a: int
    n_b: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0: the data tell the two apart at this level."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else math.nan
    return mean, var


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean ± t·s/√n over the replicates."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    mean, var = _mean_var(values)
    n = len(values)
    if n < 2:
        return Interval(mean, n, None, None)
    half = t_quantile(n - 1, level) * math.sqrt(var / n)
    return Interval(mean, n, mean - half, mean + half)


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a) − mean(b) with Welch's interval (Welch–Satterthwaite degrees of freedom): the two
    sides may have different spreads and sizes. No interval unless each side has ≥ 2 values."""
    if not a or not b:
        raise ValueError("welch needs at least one value on each side")
    (mean_a, var_a), (mean_b, var_b) = _mean_var(a), _mean_var(b)
    estimate = mean_a - mean_b
    if len(a) < 2 or len(b) < 2:
        return Difference(estimate, None, None, None, "welch", len(a), len(b))
    return _welch_interval(estimate, var_a / len(a), len(a) - 1, var_b / len(b), len(b) - 1, len(a), len(b),
                           level)


def estimate_difference(a: float, se_a: float, df_a: float, b: float, se_b: float, df_b: float,
                        level: float = LEVEL) -> Difference:
    """a − b for two independent estimates with standard errors and t degrees of freedom (two
    scaling fits' α): the Welch interval, with Welch–Satterthwaite degrees of freedom."""
    return _welch_interval(a - b, se_a**2, df_a, se_b**2, df_b, 0, 0, level)


def _welch_interval(estimate: float, sa: float, df_a: float, sb: float, df_b: float, n_a: int, n_b: int,
                    level: float) -> Difference:
    """`sa`, `sb`: the squared standard errors of the two sides."""
    se2 = sa + sb
    if se2 == 0:  # identical replicates on both sides: no spread to scale by, the interval is the point
        return Difference(estimate, estimate, estimate, math.inf, "welch", n_a, n_b)
    df = se2**2 / (sa**2 / df_a + sb**2 / df_b)
    half = t_quantile(df, level) * math.sqrt(se2)
    return Difference(estimate, estimate - half, estimate + half, df, "welch", n_a, n_b)


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a − b) over matched pairs (the same seed on both sides) with the t-interval of the
    differences: the seed's shared share of the noise cancels, so this is tighter than Welch."""
    if len(a) != len(b) or not a:
        raise ValueError("paired needs two equally long, non-empty lists")
    interval = t_interval([x - y for x, y in zip(a, b, strict=True)], level)
    df = float(len(a) - 1) if len(a) > 1 else None
    return Difference(interval.mean, interval.low, interval.high, df, "paired", len(a), len(b))
