"""gsmkit.evaluation.stats for the studies: t interval, exact McNemar, paired and hierarchical bootstraps.

Expected values are worked out by hand in the comments (t quantiles from tables; binomial sums with
math.comb; bootstrap distributions that can be enumerated)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmkit.evaluation.stats import (
    MeanInterval,
    hierarchical_bootstrap,
    mcnemar_exact,
    paired_bootstrap,
    t_interval,
)

# ---- t interval -------------------------------------------------------------------------------------------


def test_t_interval_of_one_to_four():
    # mean 2.5; sd = sqrt(5/3) = 1.2910; t(0.975, 3 dof) = 3.18245; half = 3.18245 * 1.2910 / 2 = 2.0543
    ci = t_interval([1, 2, 3, 4])
    assert ci.n == 4
    assert ci.mean == pytest.approx(2.5)
    assert ci.sd == pytest.approx(1.2910, abs=5e-5)
    assert ci.lo == pytest.approx(0.4457, abs=5e-5)
    assert ci.hi == pytest.approx(4.5543, abs=5e-5)


def test_t_interval_of_two_values_uses_one_degree_of_freedom():
    # [0, 2]: mean 1, sd sqrt(2), half = t(0.975, 1) * sqrt(2) / sqrt(2) = 12.7062 (not the normal 1.96)
    ci = t_interval([0.0, 2.0])
    assert (ci.lo, ci.hi) == (pytest.approx(1 - 12.7062, abs=5e-4), pytest.approx(1 + 12.7062, abs=5e-4))


def test_t_interval_other_confidence():
    # 90%: t(0.95, 3 dof) = 2.35336; half = 2.35336 * 1.29099 / 2 = 1.51907
    ci = t_interval([1, 2, 3, 4], confidence=0.90)
    assert ci.hi - ci.mean == pytest.approx(1.51907, abs=5e-5)


def test_t_interval_of_one_value_has_no_spread():
    assert t_interval([0.3]) == MeanInterval(mean=0.3, sd=None, lo=None, hi=None, n=1)


def test_t_interval_of_equal_values_is_a_point():
    ci = t_interval([0.25, 0.25, 0.25])
    assert (ci.sd, ci.lo, ci.hi) == (0.0, 0.25, 0.25)


@pytest.mark.parametrize("values", [[], [1.0, math.nan], [1.0, math.inf]])
def test_t_interval_refuses_empty_or_non_finite(values):
    with pytest.raises(ValueError):
        t_interval(values)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_confidence_must_be_a_fraction(confidence):
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1, 2], confidence=confidence)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([0, 1], confidence=confidence)


# ---- McNemar ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 6, 0.125),  # 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
        (6, 1, 0.125),  # symmetric
        (0, 5, 0.0625),  # 2 / 2^5
        (2, 10, 158 / 4096),  # 2 * (1 + 12 + 66) / 2^12
        (4, 12, 5034 / 65536),  # 2 * (1 + 16 + 120 + 560 + 1820) / 2^16
        (3, 3, 1.0),  # the two tails overlap: capped at 1
        (0, 0, 1.0),  # no discordant pairs: no evidence either way
        (0, 1, 1.0),
    ],
)
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_exact_is_twice_the_smaller_binomial_tail(b, c):
    n = b + c
    expected = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("b", "c"), [(-1, 2), (1.5, 2)])
def test_mcnemar_exact_refuses_impossible_counts(b, c):
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(b, c)


# ---- paired bootstrap -------------------------------------------------------------------------------------


def _diffs(minus: int, zero: int, plus: int) -> list[int]:
    return [-1] * minus + [0] * zero + [1] * plus


def test_paired_bootstrap_is_the_documented_percentile_method():
    """n_boot resamples of the n differences with replacement from default_rng(seed), their means, numpy's
    linear 2.5% and 97.5% quantiles: recomputed here in one call (the function draws in blocks of rows)."""
    d = np.array(_diffs(13, 400, 87), dtype=float)
    rng = np.random.default_rng(7)
    means = d[rng.integers(0, d.size, size=(10000, d.size))].mean(axis=1)
    expected = tuple(np.quantile(means, [0.025, 0.975]))
    assert paired_bootstrap(d, n_boot=10000, seed=7) == pytest.approx(expected, abs=1e-15)


def test_paired_bootstrap_is_deterministic_for_a_seed():
    d = np.random.default_rng(0).normal(size=300)  # continuous: two seeds' quantiles cannot tie on a grid
    assert paired_bootstrap(d, seed=3) == paired_bootstrap(d, seed=3)
    assert paired_bootstrap(d, seed=3) != paired_bootstrap(d, seed=4)


def test_paired_bootstrap_is_centred_on_the_mean_with_the_normal_width():
    # 50 x -1, 350 x 0, 100 x +1: mean 0.1, variance 0.3 - 0.01 = 0.29, se = sqrt(0.29 / 500) = 0.024083,
    # so about 0.1 -/+ 1.96 * 0.024083 = (0.0528, 0.1472)
    lo, hi = paired_bootstrap(_diffs(50, 350, 100), seed=0)
    assert lo < 0.1 < hi
    assert (lo + hi) / 2 == pytest.approx(0.1, abs=0.004)
    assert lo == pytest.approx(0.0528, abs=0.004) and hi == pytest.approx(0.1472, abs=0.004)


def test_paired_bootstrap_of_two_items_is_the_full_range():
    # resampling [0, 1] twice gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1
    assert paired_bootstrap([0, 1], seed=0) == (0.0, 1.0)


@pytest.mark.parametrize("value", [0.0, 1.0, -1.0])
def test_paired_bootstrap_of_identical_differences_is_a_point(value):
    assert paired_bootstrap([value] * 64, n_boot=500) == (value, value)


def test_paired_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([])
    with pytest.raises(ValueError):
        paired_bootstrap([0.0, math.nan])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([0, 1], n_boot=0)


# ---- hierarchical bootstrap -------------------------------------------------------------------------------


def test_hierarchical_bootstrap_resamples_the_groups():
    # each group is constant, so only the draw of groups varies: 20 groups of mean 1 or 0 (10 each, of sizes
    # 10 and 90) give mean-of-group-means ~ Binomial(20, 1/2) / 20, whose 2.5% / 97.5% points are 0.3 / 0.7
    # (P(X <= 5) = 0.021, P(X <= 6) = 0.058). The groups weigh equally: the pooled item mean would be 0.1.
    groups = [[1.0] * 10] * 10 + [[0.0] * 90] * 10
    assert hierarchical_bootstrap(groups, seed=0) == (pytest.approx(0.3), pytest.approx(0.7))


def test_hierarchical_bootstrap_resamples_the_items_within_a_group():
    # one group [0, 1]: only the items vary, as in the paired bootstrap (fixed items would give (0.5, 0.5))
    assert hierarchical_bootstrap([[0, 1]], seed=0) == (0.0, 1.0)


def test_hierarchical_bootstrap_of_three_constant_groups():
    # groups 0, 1, 2: the mean of 3 draws is 0 with probability 1/27 = 3.7% > 2.5%, likewise 2: (0, 2)
    assert hierarchical_bootstrap([[0.0] * 5, [1.0] * 7, [2.0] * 3], seed=1) == (0.0, 2.0)


def test_hierarchical_bootstrap_is_deterministic_and_centred():
    rng = np.random.default_rng(11)
    groups = [rng.choice([-1, 0, 1], size=n, p=[0.1, 0.7, 0.2]) for n in (500, 500, 480)]
    centre = float(np.mean([g.mean() for g in groups]))
    lo, hi = hierarchical_bootstrap(groups, seed=5)
    assert (lo, hi) == hierarchical_bootstrap(groups, seed=5)
    assert lo < centre < hi
    assert (lo + hi) / 2 == pytest.approx(centre, abs=0.01)
    # wider than a bootstrap of one seed's problems alone: the seeds' spread is counted too
    one_lo, one_hi = paired_bootstrap(groups[0], seed=5)
    assert hi - lo > (one_hi - one_lo) / 2


def test_hierarchical_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError):
        hierarchical_bootstrap([])
    with pytest.raises(ValueError, match="group 1"):
        hierarchical_bootstrap([[0.0, 1.0], []])
