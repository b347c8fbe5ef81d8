"""gsmkit.evaluation.stats: the Wilson score interval."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmkit.evaluation.stats import wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "lower", "upper"),
    [
        (0, 8, 0.0, 0.3244),
        (5, 10, 0.2366, 0.7634),
        (8, 8, 0.6756, 1.0),
        (1, 1, 0.2065, 1.0),
        (0, 1, 0.0, 0.7935),
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998) Stat Med 17:857, example 81/263, score method
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_known_values(successes, n, lower, upper):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(lower, abs=5e-5)
    assert hi == pytest.approx(upper, abs=5e-5)


def test_closed_form_at_zero():
    """With no successes the upper bound is z^2 / (n + z^2)."""
    z = 1.959963984540054
    for n in (1, 3, 10, 1319):
        assert wilson_interval(0, n) == (0.0, pytest.approx(z * z / (n + z * z)))


def test_extremes_are_exact():
    for n in range(1, 200):
        assert wilson_interval(0, n)[0] == 0.0
        assert wilson_interval(n, n)[1] == 1.0


def test_wider_z_gives_wider_interval():
    lo95, hi95 = wilson_interval(30, 100)
    lo99, hi99 = wilson_interval(30, 100, z=2.5758293035489)
    assert lo99 < lo95 < 0.3 < hi95 < hi99


def test_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 0.0)


@pytest.mark.parametrize(("successes", "n"), [(-1, 5), (6, 5)])
def test_impossible_counts_are_rejected(successes, n):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(successes, n)


counts = st.integers(min_value=1, max_value=100_000).flatmap(
    lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n))
)


@given(counts)
def test_bounds_in_unit_interval_and_contain_the_proportion(sn):
    successes, n = sn
    lo, hi = wilson_interval(successes, n)
    assert 0.0 <= lo <= successes / n <= hi <= 1.0
    assert not (math.isnan(lo) or math.isnan(hi))


@given(counts)
def test_symmetric_under_relabelling(sn):
    successes, n = sn
    lo, hi = wilson_interval(successes, n)
    lo2, hi2 = wilson_interval(n - successes, n)
    assert lo == pytest.approx(1 - hi2, abs=1e-12)
    assert hi == pytest.approx(1 - lo2, abs=1e-12)


@given(st.integers(min_value=1, max_value=10_000))
def test_more_data_narrows_the_interval(n):
    lo1, hi1 = wilson_interval(n, 2 * n)
    lo2, hi2 = wilson_interval(2 * n, 4 * n)
    assert hi2 - lo2 < hi1 - lo1
