"""Small statistics shared by the evaluations and the studies (report, compare, bench).

In: counts of successes, samples of values, per-problem paired differences. Out: intervals and p-values:
- `wilson_interval`: a proportion's 95% score interval (accuracy, safety rate);
- `t_interval`: the mean of a few replicates (runs that differ only in their seed) with Student's t interval;
- `mcnemar_exact`: the exact two-sided McNemar test of two paired evaluations (only the discordant pairs);
- `paired_bootstrap`: percentile interval of the mean of paired differences (b - a per problem);
- `hierarchical_bootstrap`: the same across groups (seeds) and items (problems) at once.
The bootstraps draw from `numpy.random.default_rng(seed)`: the same inputs and seed give the same interval.
numpy and scipy are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Bootstrap replicates are drawn in blocks of about this many indices, so memory stays bounded (~16 MB of
# int64) whatever the sample size, while each block is still one vectorised numpy call.
_BLOCK = 2_000_000


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (better than the normal interval near 0 and 1)."""
    if n <= 0:
        return (0.0, 0.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 and p = 1 the bound is exactly 0 or 1; rounding would leave e.g. 5.6e-17 or
    # 0.9999999999999999, an interval that excludes the observed proportion.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return (lower, upper)


@dataclass(frozen=True)
class MeanInterval:
    """A sample mean with its spread: `sd` (n - 1 denominator) and the t interval `lo`..`hi`; with fewer
    than 2 values there is no spread to estimate, and `sd`, `lo` and `hi` are None."""

    mean: float
    sd: float | None
    lo: float | None
    hi: float | None
    n: int


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")


def _finite_array(values: Sequence[float], what: str) -> Any:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of numbers")
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: every value must be finite")
    return arr


def t_interval(values: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """Mean of `values` with Student's t interval, n - 1 degrees of freedom: mean -/+ t * sd / sqrt(n).

    For a handful of replicates (3 seeds) the t quantile (4.30 for 2 dof) is what makes the interval honest;
    the normal 1.96 would be less than half as wide."""
    from scipy import stats

    _check_confidence(confidence)
    arr = _finite_array(values, "t_interval")
    n = int(arr.size)
    mean = float(arr.mean())
    if n < 2:
        return MeanInterval(mean=mean, sd=None, lo=None, hi=None, n=n)
    sd = float(arr.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return MeanInterval(mean=mean, sd=sd, lo=mean - half, hi=mean + half, n=n)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: `b` problems right only in the first evaluation, `c` only in the
    second. Under "no difference" each discordant problem is equally likely to fall either way, so b is
    Binomial(b + c, 1/2); the concordant problems carry no information. No discordant pairs: p = 1."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"discordant counts must be whole numbers >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy import stats

    return float(min(1.0, stats.binomtest(int(b), int(b + c), 0.5).pvalue))


def _bootstrap_means(rng: Any, values: Any, reps: int) -> Any:
    """`reps` means of resamples (with replacement, same size) of the 1-d array `values`."""
    import numpy as np

    n = values.size
    out = np.empty(reps)
    block = max(1, _BLOCK // n)
    for start in range(0, reps, block):
        stop = min(reps, start + block)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def _percentile_interval(replicates: Any, confidence: float) -> tuple[float, float]:
    import numpy as np

    alpha = 1 - confidence
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])  # numpy's default (linear) quantiles
    return (float(lo), float(hi))


def _check_boot(n_boot: int, confidence: float) -> None:
    _check_confidence(confidence)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a whole number >= 1, got {n_boot}")


def paired_bootstrap(diffs: Sequence[float], *, n_boot: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(diffs): `n_boot` resamples of the n paired differences (one per
    problem, e.g. b correct - a correct in {-1, 0, 1}) with replacement, the mean of each, and the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of those means. Resampling whole pairs keeps
    the correlation between the two evaluations, which is what makes a paired interval narrower than two
    independent ones."""
    import numpy as np

    _check_boot(n_boot, confidence)
    arr = _finite_array(diffs, "paired_bootstrap")
    rng = np.random.default_rng(seed)
    return _percentile_interval(_bootstrap_means(rng, arr, int(n_boot)), confidence)


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], *, n_boot: int = 10000, seed: int = 0,
                           confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups of each group's mean (e.g. per seed, the mean
    paired difference over its problems), with both sources of variation: each replicate draws as many
    groups as there are, with replacement, then resamples the items of each drawn group with replacement
    (a fresh resample every time a group is drawn), and averages the group means. With one group this is
    `paired_bootstrap` of that group (in distribution)."""
    import numpy as np

    _check_boot(n_boot, confidence)
    arrays = [_finite_array(g, f"hierarchical_bootstrap group {i}") for i, g in enumerate(groups)]
    if not arrays:
        raise ValueError("hierarchical_bootstrap: no groups")
    reps, n_groups = int(n_boot), len(arrays)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_groups, size=(reps, n_groups))  # which group fills each slot of each replicate
    group_means = np.empty((reps, n_groups))
    for g, arr in enumerate(arrays):
        slots = drawn == g
        group_means[slots] = _bootstrap_means(rng, arr, int(slots.sum()))
    return _percentile_interval(group_means.mean(axis=1), confidence)
