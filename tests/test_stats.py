"""The replicate statistics agree with scipy's reference implementations on arbitrary samples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from newllm_kit.stats import paired, t_interval, welch

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
