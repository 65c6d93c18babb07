"""The report's statistics in one place: a two-level bootstrap, Holm's step-down and verdicts.

**Two-level bootstrap.** A variant's students are trained with different seeds and scored on
their own probes, so an arm mean has two sources of error: which seeds were drawn and which
probes each was scored on. A resample draws the units (students, or (student, parent) pairs)
with replacement, then each drawn unit's probes with replacement, independently for every
slot. Pooling every probe of a variant and resampling the pool would count only the second
source and call a difference "significant" that one lucky seed made.

Resampling n probes of one unit is done through its distinct values: the resample's value
counts are Multinomial(n, observed frequencies), the same distribution as drawing n indices,
at the cost of one multinomial draw per slot (exact match has two values, token accuracy nine),
so 20 000 resamples of a few hundred probes take milliseconds.

**Holm.** Sorted by p, the i-th smallest (0-based) is rejected at level α/(m − i) until the
first that is not; every later one is kept too. Its interval is taken at the level of its own
step (α/(m − i)), or of the step where the procedure stopped for those after it, so that an
interval excludes zero exactly when its hypothesis is rejected.

**Verdicts** (``verdict``): *reproduced* / *reversed* when the adjusted interval excludes zero
in the claimed / the other direction; *not reproduced* when it lies inside ±``margin`` (an
equivalence test at the same level: any effect is smaller than the margin); otherwise
*inconclusive* (the interval reaches past the margin and across zero).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ALPHA = 0.05
BOOTSTRAP = 20_000  # the Holm-adjusted tails reach α/(2m) ≈ 0.001: ~20 resamples beyond each endpoint
MARGIN = 0.06  # retrieval accuracies: a difference smaller than this is no effect

# A unit: the arrays whose means make its value, each with a sign (one array for a student;
# (student − parent) probe differences, or a student's and its parent's probes, for a pair).
Unit = list[tuple[np.ndarray, float]]


def resample_means(values: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] means of bootstrap resamples of ``values`` (each of ``len(values)`` draws)."""
    values = np.asarray(values, dtype=float)
    if n == 0:
        return np.empty(0)
    u, counts = np.unique(values, return_counts=True)
    if len(u) == 1:
        return np.full(n, u[0])
    draws = rng.multinomial(len(values), counts / len(values), size=n)  # [n, distinct]
    return draws @ u / len(values)


def unit_value(unit: Unit) -> float:
    return float(sum(sign * np.mean(a) for a, sign in unit))


def two_level(units: Sequence[Unit], rng: np.random.Generator, n: int = BOOTSTRAP) -> np.ndarray:
    """[n] bootstrap means over ``units``: resample the units, then each drawn unit's probes
    (a fresh probe resample for every slot, also when a unit is drawn twice)."""
    k = len(units)
    if k == 0:
        return np.full(n, np.nan)
    picked = rng.integers(0, k, (n, k))  # [n, k] which unit fills each slot
    out = np.zeros((n, k))
    for i, unit in enumerate(units):
        mask = picked == i
        for a, sign in unit:
            out[mask] += sign * resample_means(a, rng, int(mask.sum()))
    return out.mean(1)


def boot_p(boot: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is zero": twice the smaller tail mass
    at zero, at least 1/resamples."""
    if not len(boot):
        return float("nan")
    p = 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0)))
    return min(1.0, max(p, 1.0 / len(boot)))


def holm(p: Sequence[float], alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """(rejected, level) per p-value, in the order given: Holm's step-down, and the level at
    which each one's interval is taken (see the module docstring)."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    rejected, level = np.zeros(m, dtype=bool), np.full(m, alpha / max(m, 1))
    stop = None
    for i, j in enumerate(np.argsort(p, kind="stable")):
        if stop is None and p[j] <= alpha / (m - i):
            rejected[j] = True
        elif stop is None:
            stop = i
        level[j] = alpha / (m - (i if stop is None else stop))
    return rejected, level


def interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The central (1 − level) percentile interval of the bootstrap differences."""
    return float(np.quantile(boot, level / 2)), float(np.quantile(boot, 1 - level / 2))


def verdict(lo: float, hi: float, rejected: bool = True, margin: float | None = MARGIN) -> str:
    """The verdict of a claimed positive difference from its adjusted interval [lo, hi] and
    whether Holm rejected "no difference"."""
    if rejected and lo > 0:
        return "reproduced"
    if rejected and hi < 0:
        return "reversed"
    if margin is not None and -margin <= lo and hi <= margin:
        return "not reproduced"
    return "inconclusive"


def z(q: float) -> float:
    """The standard normal quantile (``statistics.NormalDist``: no scipy needed)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)
