"""The replicate statistics agree with scipy's and numpy's reference implementations on arbitrary
samples; the document bootstrap and the seed intervals cover a known difference on synthetic data."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from newllm_kit import bootstrap
from newllm_kit.stats import combine, holm, paired, t_interval, welch

COVERAGE = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"

values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
samples = st.lists(values, min_size=2, max_size=8).filter(lambda xs: max(xs) - min(xs) > 1e-3)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_t_interval_matches_scipy(xs: list[float]) -> None:
    got = t_interval(xs)
    mean = math.fsum(xs) / len(xs)  # the centre from the sample, not from the function under test
    low, high = scipy_stats.t.interval(0.95, len(xs) - 1, loc=mean, scale=scipy_stats.sem(xs))
    assert got.n == len(xs)
    assert got.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert got.low == pytest.approx(low, rel=1e-9, abs=1e-9)
    assert got.high == pytest.approx(high, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(samples, samples)
def test_welch_matches_scipy(a: list[float], b: list[float]) -> None:
    got = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got.estimate == pytest.approx(sum(a) / len(a) - sum(b) / len(b), abs=1e-9)
    assert got.low == pytest.approx(ref.low, rel=1e-7, abs=1e-7)
    assert got.high == pytest.approx(ref.high, rel=1e-7, abs=1e-7)
    assert got.excludes_zero == (ref.low > 0 or ref.high < 0) or min(abs(ref.low), abs(ref.high)) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(values, values), min_size=2, max_size=8)
       .filter(lambda ps: len({round(x - y, 6) for x, y in ps}) > 1))
def test_paired_matches_scipy(pairs: list[tuple[float, float]]) -> None:
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    got = paired(a, b)
    ref = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got.low == pytest.approx(ref.low, rel=1e-7, abs=1e-7)
    assert got.high == pytest.approx(ref.high, rel=1e-7, abs=1e-7)
    assert got.df == len(pairs) - 1 and got.method == "paired"


def test_pairing_removes_the_shared_seed_noise() -> None:
    """Seeds shift both sides alike; the paired interval sees only the constant gap."""
    a = [100.0, 120.0, 90.0]
    b = [x + 2.0 + d for x, d in zip(a, (0.1, -0.1, 0.0), strict=True)]
    assert not welch(a, b).excludes_zero
    assert paired(a, b).excludes_zero and paired(a, b).high is not None and paired(a, b).high < 0


def test_one_value_has_no_interval() -> None:
    assert t_interval([3.0]).low is None and t_interval([3.0]).half_width is None
    assert welch([1.0], [2.0, 3.0]).low is None
    assert math.isclose(welch([1.0], [2.0, 3.0]).estimate, -1.5)
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=1, max_size=8))
def test_holm_matches_its_definition(p: list[float]) -> None:
    """Holm's adjusted p-values, written out: p_(k) × (m − k + 1), made non-decreasing, capped at 1."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    expected = [0.0] * m
    for k, i in enumerate(order):
        expected[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(k + 1))
    assert holm(p) == pytest.approx(expected, abs=1e-12)
    assert all(a >= b for a, b in zip(holm(p), p, strict=True))


def test_zero_spread_has_no_interval_at_all() -> None:
    """Two sides without any spread say nothing about the noise: no interval, never a zero-width one."""
    assert welch([1.0, 1.0, 1.0], [2.0, 2.0]).low is None
    assert paired([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]).low is None  # the same difference every time
    assert welch([1.0, 1.0], [2.0, 2.0]).p is None


def test_combine_adds_an_independent_standard_error_with_satterthwaite_df() -> None:
    seeds = welch([1.0, 1.2, 0.9], [0.7, 0.8, 0.75])
    assert seeds.se is not None and seeds.df is not None
    both = combine(seeds, 0.05)
    se2 = seeds.se**2 + 0.05**2
    df = se2**2 / (seeds.se**4 / seeds.df)  # the documents' share counts with infinite df
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert both.method == "welch+documents" and both.df == pytest.approx(df)
    assert (both.low, both.high) == pytest.approx((seeds.estimate - half, seeds.estimate + half))
    assert combine(seeds, 0.0).low == pytest.approx(seeds.low)
    assert seeds.p == pytest.approx(scipy_stats.ttest_ind([1.0, 1.2, 0.9], [0.7, 0.8, 0.75], equal_var=False).pvalue)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 60), st.integers(0, 2**16))
def test_document_bootstrap_matches_a_numpy_reference(documents: int, resamples: int, seed: int) -> None:
    """Each replicate is Σ count·NLL / Σ count·tokens on each side, on the same counts; the interval is
    numpy's percentile of the replicates; every resample draws `documents` documents."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=documents).astype(float)
    a, b = tokens * rng.normal(5, 1, size=documents), tokens * rng.normal(5, 1, size=documents)
    counts = np.concatenate(list(bootstrap.resample_counts(documents, resamples, seed)))
    assert counts.shape == (resamples, documents) and (counts.sum(1) == documents).all()
    expected = [sum(c * a) / sum(c * tokens) - sum(c * b) / sum(c * tokens) for c in counts]
    got = bootstrap.mean_differences(a, b, tokens, resamples, seed)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert bootstrap.percentile_interval(got) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])))
    assert bootstrap.p_value(got) == pytest.approx(min(1.0, 2 * min(np.mean(got <= 0), np.mean(got >= 0))))


def test_the_document_bootstrap_is_seeded_and_its_spread_is_the_standard_error() -> None:
    """Same sums, same interval; the spread of 2,000 replicates of a mean of independent documents is
    within 10 % of the delta-method standard error of a ratio estimator."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(50, 200, size=400).astype(float)
    a = tokens * rng.normal(4.0, 0.5, size=400)
    b = tokens * 3.0
    first, again = (bootstrap.mean_differences(a, b, tokens) for _ in range(2))
    assert np.array_equal(first, again) and first.size == bootstrap.RESAMPLES >= 2000
    ratio = a.sum() / tokens.sum()
    residual = a - ratio * tokens
    delta_se = math.sqrt(np.sum(residual**2) / len(a) ** 2) / tokens.mean()
    assert np.std(first, ddof=1) == pytest.approx(delta_se, rel=0.1)


def test_coverage_of_the_intervals_on_synthetic_comparisons() -> None:
    """benchmarks/coverage.py at 200 trials (the full run uses ≥ 1,000): each kind covers the true
    difference in 89–99.5 % of its 95 % intervals (the binomial margin at 200 trials is ± 3 points)."""
    spec = importlib.util.spec_from_file_location("coverage_benchmark", COVERAGE)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for kind in script.KINDS:
        assert 0.89 <= script.coverage(kind, trials=200, resamples=500, seed=1) <= 0.995, kind
