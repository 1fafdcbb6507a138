"""The statistics of ``flatpeft compare``, in plain Python (no SciPy): paired differences with a
Student-t interval, the exact sign test, Spearman's rank correlation with a Fisher-z interval.

Every function takes per-seed numbers and returns plain floats, so a reader can recompute a table
cell by hand from the per-seed values that ``compare.csv`` and ``compare.json`` carry.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Paired", "paired", "sign_test", "spearman", "t_quantile"]


def _t_two_sided_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with an integer ``df`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ · (1 + ½cos²θ + (1·3)/(2·4)cos⁴θ + ...), df/2 terms
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0  # (2/π)(θ + sin θ cos θ (1 + ⅔cos²θ + ...)), (df-1)/2 terms
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``0.5 < p < 1``) of Student's t with ``df >= 1`` degrees of freedom.

    Raises:
        ValueError: ``p`` outside (0.5, 1) or ``df`` < 1.
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    mass = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < mass:
        hi *= 2
    for _ in range(200):  # bisection to machine precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < mass else (lo, mid)
    return (lo + hi) / 2


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign-test p-value for ``wins`` positive and ``losses`` negative differences
    (ties dropped): ``min(1, 2·P(X <= min(wins, losses)))`` with ``X ~ Binomial(wins + losses, ½)``."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A method minus the reference, paired by seed.

    Attributes:
        seeds: The seeds both have.
        diffs: ``method - reference`` per seed, in the order of ``seeds``.
        mean: Mean of ``diffs``.
        low, high: Its two-sided ``level`` t-interval (``None`` with fewer than two seeds).
        level: Confidence level of the interval.
        marker: ``+1`` / ``-1`` when the interval lies above / below zero, ``0`` when it holds zero,
            or with fewer than :data:`MIN_MARKED` seeds, or differences all equal (no spread).
        wins, losses: Seeds where the difference is positive / negative.
        sign_p: Exact two-sided sign-test p-value of ``wins`` against ``losses``.
    """

    seeds: list[int]
    diffs: list[float]
    mean: float
    low: float | None
    high: float | None
    level: float
    marker: int
    wins: int
    losses: int
    sign_p: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


#: Fewest paired seeds whose interval is marked: two seeds' t-interval rests on one degree of freedom,
#: and equal differences (one example either way on every seed) give an interval of no width.
MIN_MARKED = 3


def paired(reference: dict[int, float], other: dict[int, float], level: float = 0.95) -> Paired | None:
    """``other - reference`` on the seeds both have, with its mean, t-interval and sign test.

    Args:
        reference, other: ``seed -> value``.
        level: Confidence level of the two-sided interval.

    Returns:
        A :class:`Paired`, or ``None`` when the two share no seed.
    """
    seeds = [s for s in reference if s in other]
    if not seeds:
        return None
    diffs = [other[s] - reference[s] for s in seeds]
    mean = statistics.fmean(diffs)
    low = high = None
    marker = 0
    if len(diffs) > 1:
        half = t_quantile((1 + level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
        spread = statistics.stdev(diffs) > 1e-9 * max(1.0, abs(mean))  # not equal up to rounding
        if len(diffs) >= MIN_MARKED and spread:
            marker = 1 if low > 0 else -1 if high < 0 else 0
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return Paired(seeds, diffs, mean, low, high, level, marker, wins, losses, sign_test(wins, losses))


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Spearman's rank correlation of ``x`` and ``y`` and its ``level`` interval.

    The interval is Fisher's z-transform with the standard error ``sqrt(1.06 / (n - 3))`` of Fieller,
    Hartley and Pearson (1957); it needs ``n >= 4`` pairs (``low``/``high`` are ``None`` below).

    Returns:
        ``{"rho", "low", "high", "n", "level"}`` (``rho`` is ``None`` when either side is constant).

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs equally long x and y, got {len(x)} and {len(y)}")
    n = len(x)
    out: dict[str, Any] = {"rho": None, "low": None, "high": None, "n": n, "level": level}
    if n < 2:
        return out
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return out
    rho = sxy / math.sqrt(sxx * syy)
    out["rho"] = rho
    if n >= 4:
        z = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12))
        half = statistics.NormalDist().inv_cdf((1 + level) / 2) * math.sqrt(1.06 / (n - 3))
        out["low"], out["high"] = math.tanh(z - half), math.tanh(z + half)
    return out
