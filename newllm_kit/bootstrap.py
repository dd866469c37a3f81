"""The paired bootstrap over validation documents: how much a difference in mean NLL would move on
another draw of documents like these.

A resample draws D documents with replacement from the D validation documents (a row of counts, how
often each is drawn); both sides of a comparison are scored on the same draw (paired), and each side's
statistic is its token-weighted mean NLL, Σ count·NLL / Σ count·tokens. The generator is seeded, so
the same sums give the same interval every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

RESAMPLES = 2000
SEED = 0
BLOCK = 250  # resamples drawn at once: memory is BLOCK × D counts


def resample_counts(documents: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[np.ndarray]:
    """[≤ BLOCK, documents] blocks of counts, `resamples` rows in all, each row summing to `documents`."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, BLOCK):
        yield rng.multinomial(documents, np.full(documents, 1 / documents), size=min(BLOCK, resamples - start))


def mean_differences(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = SEED) -> np.ndarray:
    """[resamples] mean NLL of a minus mean NLL of b, each resample of documents shared by both: per
    document NLL sums `nll_a`, `nll_b` [D] (a side's mean over its seeds) and scored tokens [D]."""
    values = np.stack([nll_a, nll_b], axis=1)
    out = []
    for counts in resample_counts(len(tokens), resamples, seed):
        means = (counts @ values) / (counts @ tokens)[:, None]
        out.append(means[:, 0] - means[:, 1])
    return np.concatenate(out)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` share of the replicates (numpy's linear-interpolated quantiles)."""
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def p_value(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the share of replicates on the far side of 0."""
    below, above = float(np.mean(replicates <= 0)), float(np.mean(replicates >= 0))
    return min(1.0, 2 * min(below, above))
