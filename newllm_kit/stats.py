"""Small-sample statistics for replicated runs: a mean with its t-interval, and the difference of
two means (Welch's unequal-variance interval, or the paired interval when the design pairs the
seeds). Seeds are few (3–5), so every interval uses Student's t, never a normal approximation.
Two sides without any spread get no interval (never a zero-width one). `combine` adds a second,
independent source of noise (the validation documents, `newllm_kit.bootstrap`) to a seed interval,
and `holm` corrects the verdicts of several comparisons made at once.

Pure functions over lists of floats; `compare`, the results table and the sweep plots share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    """`a − b` with its interval; `method` is "welch" or "paired" (with "+documents" where `combine`
    added the documents' share), `df` the t degrees of freedom and `se` the standard error. No
    interval (`low` None) where a side has one value or neither side varies."""

    estimate: float
    low: float | None
    high: float | None
    df: float | None
    method: str
    n_a: int
    n_b: int
    se: float | None = None

    @property
    def p(self) -> float | None:
        """The two-sided p-value of "no difference" under the t-interval's assumptions."""
        if self.se is None or self.df is None or self.low is None:
            return None
        from scipy import stats

        return float(2 * stats.t.sf(abs(self.estimate) / self.se, self.df))

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
    if se2 == 0:  # identical replicates on both sides: nothing to scale a difference by
        return Difference(estimate, None, None, None, "welch", n_a, n_b)
    df = se2**2 / (sa**2 / df_a + sb**2 / df_b)
    half = t_quantile(df, level) * math.sqrt(se2)
    return Difference(estimate, estimate - half, estimate + half, df, "welch", n_a, n_b, math.sqrt(se2))


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Difference:
    """mean(a − b) over matched pairs (the same seed on both sides) with the t-interval of the
    differences: the seed's shared share of the noise cancels, so this is tighter than Welch."""
    if len(a) != len(b) or not a:
        raise ValueError("paired needs two equally long, non-empty lists")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    interval = t_interval(differences, level)
    mean, var = _mean_var(differences)
    if len(a) < 2 or var == 0:  # one pair, or the same difference every time: no spread to scale by
        return Difference(mean, None, None, None, "paired", len(a), len(b))
    return Difference(interval.mean, interval.low, interval.high, float(len(a) - 1), "paired", len(a), len(b),
                      math.sqrt(var / len(a)))


def combine(seeds: Difference, documents_se: float, level: float = LEVEL) -> Difference:
    """`seeds`' interval widened by an independent source of noise with standard error `documents_se`
    (the validation documents, measured by the bootstrap with many resamples, so its degrees of
    freedom count as infinite): se² = se_seeds² + se_documents², with Welch–Satterthwaite degrees of
    freedom. The documents' spread also holds a little of the seeds' (each document's score varies
    by seed), so the interval errs on the wide side."""
    if seeds.se is None or seeds.df is None:
        raise ValueError("combine needs a seed interval")
    se2 = seeds.se**2 + documents_se**2
    if se2 == 0:
        return replace(seeds, low=None, high=None, df=None, se=None, method=f"{seeds.method}+documents")
    df = seeds.df * se2**2 / seeds.se**4 if seeds.se > 0 else math.inf
    half = t_quantile(df, level) * math.sqrt(se2)
    return replace(seeds, low=seeds.estimate - half, high=seeds.estimate + half, df=df, se=math.sqrt(se2),
                   method=f"{seeds.method}+documents")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together: the k-th smallest is multiplied by
    (m − k + 1), and the adjusted values never decrease in that order. Comparing each with α keeps
    the chance of any false "distinguishable" at most α over all m."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
