"""Statistics for comparing eviction policies on the same prompts (standard library only).

    stats.wilson_interval(41, 50)                      # Interval(low=0.692, high=0.902): one accuracy's CI
    stats.proportion([True, False, True])               # Proportion(successes=2, n=3, value=0.667, low=, high=)
    stats.mcnemar(seed_correct, baseline_correct)       # exact McNemar: the binomial test on discordant pairs
    stats.sign_test(seed_scores, baseline_scores)       # the same test on real-valued paired scores
    stats.paired_difference_interval(seed_correct, baseline_correct)   # Newcombe's CI of the difference
    stats.holm([p1, p2, ...])                           # Holm's step-down adjusted p-values

Accuracy on n prompts is a binomial proportion: its confidence interval is Wilson's score interval,
which stays inside [0, 1] and keeps its coverage at 0 and n successes (where the Wald interval
collapses to a point). Two policies run on the same prompts give paired outcomes: only the prompts
where they disagree (the discordant pairs, b where the first is right and c where the second is)
carry information about which is better. Under "no difference" each discordant pair is a fair coin,
so the exact test is the binomial test of b successes in b + c trials with p = 1/2: McNemar's exact
test for right/wrong outcomes, the sign test for scores (ties dropped). The difference of the two
accuracies, (b - c) / n, gets Newcombe's (1998) method-10 interval: each accuracy's Wilson interval,
combined with the phi correlation of the paired table.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction
from statistics import NormalDist
from typing import Sequence

import numpy as np

ALTERNATIVES = ("two-sided", "greater", "less")


@dataclasses.dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class Proportion:
    """successes of n, value = successes / n, and its Wilson interval [low, high]."""

    successes: int
    n: int
    value: float
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """An exact test of paired outcomes.

    n: pairs compared; wins: pairs where the first scores higher (McNemar's b); losses: where the
    second does (c); ties: the rest (both right or both wrong, or equal scores). p_value: the exact
    binomial test of `wins` in wins + losses trials with p = 1/2, for `alternative` ("greater": the
    first is better). difference: mean of first - second over all n pairs (for right/wrong outcomes,
    the difference of the two accuracies).
    """

    n: int
    wins: int
    losses: int
    ties: int
    p_value: float
    difference: float
    alternative: str = "two-sided"


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")


def _check_count(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile: 1.959963... for 0.95."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval for a binomial proportion successes / n.

    centre = (k + z^2/2) / (n + z^2),  half-width = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4).
    """
    n = _check_count("n", n, 1)
    k = _check_count("successes", successes)
    if k > n:
        raise ValueError(f"successes ({k}) must be at most n ({n})")
    z = z_value(confidence)
    z2 = z * z
    centre = (k + z2 / 2.0) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4.0)
    # at k = 0 (k = n) the lower (upper) limit is exactly 0 (1); clamp the rounding there
    return Interval(0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def proportion(outcomes: Sequence[bool], confidence: float = 0.95) -> Proportion:
    """Successes among right/wrong outcomes, with the Wilson interval."""
    flags = _flags("outcomes", outcomes)
    k, n = sum(flags), len(flags)
    ci = wilson_interval(k, n, confidence)
    return Proportion(k, n, k / n, ci.low, ci.high)


def binomial_test(k: int, n: int, alternative: str = "two-sided") -> float:
    """Exact p-value of k successes in n trials under p = 1/2 (exact integer arithmetic).

    two-sided: P(X <= min(k, n - k)) + P(X >= max(k, n - k)), at most 1 (the distribution is
    symmetric, so this is both the doubled tail and the sum of outcomes no more likely than k);
    "greater": P(X >= k); "less": P(X <= k). n = 0 gives 1.
    """
    n = _check_count("n", n)
    k = _check_count("k", k)
    if k > n:
        raise ValueError(f"k ({k}) must be at most n ({n})")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if n == 0:
        return 1.0
    total = 2 ** n

    def at_most(m: int) -> int:
        return sum(math.comb(n, i) for i in range(m + 1))

    if alternative == "greater":
        return float(Fraction(at_most(n - k), total))  # P(X >= k) = P(X <= n - k) by symmetry
    if alternative == "less":
        return float(Fraction(at_most(k), total))
    lo = min(k, n - k)
    return float(min(Fraction(1), Fraction(2 * at_most(lo), total)))


def _flags(name: str, values) -> list[bool]:
    out = []
    for v in values:
        if not isinstance(v, (numbers.Real, np.bool_)) or v not in (0, 1):
            raise ValueError(f"{name} must hold right/wrong outcomes (bool or 0/1), got {v!r}")
        out.append(bool(v))
    if not out:
        raise ValueError(f"{name} is empty: at least one outcome is needed")
    return out


def _paired(first, second, what: str):
    a, b = list(first), list(second)
    if len(a) != len(b):
        raise ValueError(f"{what}: the two sequences must pair up, got lengths {len(a)} and {len(b)}")
    if not a:
        raise ValueError(f"{what}: no pairs to compare")
    return a, b


def mcnemar(first: Sequence[bool], second: Sequence[bool], alternative: str = "two-sided") -> PairedTest:
    """McNemar's exact test of two methods' right/wrong outcomes on the same prompts (in order).

    wins (b): first right, second wrong; losses (c): the reverse; p = binomial_test(b, b + c)."""
    a, b = _paired(first, second, "mcnemar")
    a, b = _flags("first", a), _flags("second", b)
    wins = sum(x and not y for x, y in zip(a, b))
    losses = sum(y and not x for x, y in zip(a, b))
    n = len(a)
    return PairedTest(n, wins, losses, n - wins - losses, binomial_test(wins, wins + losses, alternative),
                      (wins - losses) / n, alternative)


def sign_test(first: Sequence[float], second: Sequence[float], alternative: str = "two-sided") -> PairedTest:
    """The sign test of paired real-valued scores (ties dropped from the test, kept in n)."""
    a, b = _paired(first, second, "sign_test")
    for name, xs in (("first", a), ("second", b)):
        bad = [x for x in xs if not isinstance(x, numbers.Real) or not math.isfinite(x)]
        if bad:
            raise ValueError(f"{name} must hold finite numbers, got {bad[:3]}")
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(y > x for x, y in zip(a, b))
    n = len(a)
    diff = sum(float(x) - float(y) for x, y in zip(a, b)) / n
    return PairedTest(n, wins, losses, n - wins - losses, binomial_test(wins, wins + losses, alternative), diff,
                      alternative)


def paired_difference_interval(first: Sequence[bool], second: Sequence[bool],
                               confidence: float = 0.95) -> Interval:
    """Newcombe's (1998) method-10 interval for acc(first) - acc(second) on paired outcomes.

    With the table a (both right), b (first only), c (second only), d (neither), p1 = (a + b) / n,
    p2 = (a + c) / n, their Wilson intervals (l1, u1), (l2, u2), and phi = (ad - bc) /
    sqrt((a+b)(c+d)(a+c)(b+d)) (0 when a margin is empty):
        low  = p1 - p2 - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = p1 - p2 + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)
    """
    x, y = _paired(first, second, "paired_difference_interval")
    x, y = _flags("first", x), _flags("second", y)
    n = len(x)
    a = sum(p and q for p, q in zip(x, y))
    b = sum(p and not q for p, q in zip(x, y))
    c = sum(q and not p for p, q in zip(x, y))
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    i1, i2 = wilson_interval(a + b, n, confidence), wilson_interval(a + c, n, confidence)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0 if denom == 0 else (a * d - b * c) / math.sqrt(denom)
    lo1, hi2 = p1 - i1.low, i2.high - p2
    hi1, lo2 = i1.high - p1, p2 - i2.low
    delta = math.sqrt(max(lo1 * lo1 - 2.0 * phi * lo1 * hi2 + hi2 * hi2, 0.0))
    eps = math.sqrt(max(hi1 * hi1 - 2.0 * phi * hi1 * lo2 + lo2 * lo2, 0.0))
    theta = p1 - p2
    return Interval(max(-1.0, theta - delta), min(1.0, theta + eps))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order.

    Sorted ascending, the i-th (from 0) of m becomes max over j <= i of min(1, (m - j) p_(j))."""
    ps = [float(p) for p in p_values]
    for p in ps:
        if not 0.0 <= p <= 1.0:  # also rejects nan
            raise ValueError(f"p-values must lie in [0, 1], got {p!r}")
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def fraction_of(value: float, reference: float) -> float | None:
    """value / reference (a policy's accuracy as a share of the full cache's), None when reference is 0."""
    return None if reference == 0 else value / reference


__all__ = ["ALTERNATIVES", "Interval", "PairedTest", "Proportion", "binomial_test", "fraction_of", "holm",
           "mcnemar", "paired_difference_interval", "proportion", "sign_test", "wilson_interval", "z_value"]
