"""kvjax.eval.stats against closed forms, hand-computed values and (where installed) scipy as an oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvjax.eval import stats

Z95 = 1.959963984540054


def test_z_value_is_the_normal_quantile():
    assert stats.z_value(0.95) == pytest.approx(Z95, abs=1e-12)
    assert stats.z_value(0.99) == pytest.approx(2.5758293035489004, abs=1e-12)
    assert stats.z_value(0.6826894921370859) == pytest.approx(1.0, abs=1e-9)  # one sigma


@pytest.mark.parametrize("k, n, low, high", [
    (5, 10, 0.2365930905, 0.7634069095),   # textbook values of the 95% Wilson interval
    (0, 10, 0.0, 0.2775327999),
    (10, 10, 0.7224672001, 1.0),
])
def test_wilson_interval_matches_hand_computed_limits(k, n, low, high):
    ci = stats.wilson_interval(k, n)
    assert ci.low == pytest.approx(low, abs=1e-9)
    assert ci.high == pytest.approx(high, abs=1e-9)


@pytest.mark.parametrize("k, n", [(0, 1), (3, 7), (17, 50), (49, 50), (123, 456)])
def test_wilson_interval_equals_its_closed_form(k, n):
    z = Z95
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    ci = stats.wilson_interval(k, n)
    assert ci.low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert ci.high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert 0.0 <= ci.low <= k / n <= ci.high <= 1.0


def test_wilson_interval_agrees_with_scipy():
    sps = pytest.importorskip("scipy.stats")
    for k, n in [(0, 5), (2, 9), (30, 60), (59, 60), (7, 200)]:
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
        ci = stats.wilson_interval(k, n, confidence=0.9)
        assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_proportion_counts_numpy_and_python_outcomes():
    p = stats.proportion(np.array([True, False, True, True]))
    assert (p.successes, p.n, p.value) == (3, 4, 0.75)
    assert (p.low, p.high) == (stats.wilson_interval(3, 4).low, stats.wilson_interval(3, 4).high)
    assert stats.proportion([1, 0, 0]).successes == 1


@pytest.mark.parametrize("k, n, alternative, p", [
    (0, 5, "two-sided", 2 / 32),
    (0, 6, "two-sided", 2 / 64),          # 6 discordant pairs, all one way: the fewest for p < 0.05
    (1, 10, "two-sided", 2 * 11 / 1024),
    (5, 10, "two-sided", 1.0),            # 2 P(X <= 5) > 1: capped
    (4, 10, "two-sided", 2 * 386 / 1024),
    (9, 10, "greater", 11 / 1024),
    (9, 10, "less", 1023 / 1024),
    (0, 0, "two-sided", 1.0),
])
def test_binomial_test_matches_hand_computed_tails(k, n, alternative, p):
    assert stats.binomial_test(k, n, alternative) == pytest.approx(p, rel=1e-12)


def test_binomial_test_agrees_with_scipy_on_large_counts():
    sps = pytest.importorskip("scipy.stats")
    for k, n in [(150, 236), (86, 236), (40, 90), (500, 1000)]:
        for alt in ("two-sided", "greater", "less"):
            assert stats.binomial_test(k, n, alt) == pytest.approx(sps.binomtest(k, n, 0.5, alternative=alt).pvalue,
                                                                   rel=1e-9)


def test_mcnemar_counts_discordant_pairs_only():
    first = [True] * 12 + [True] * 2 + [False] * 9 + [False] * 27     # a=12, b=2
    second = [True] * 12 + [False] * 2 + [True] * 9 + [False] * 27    # c=9, d=27
    t = stats.mcnemar(first, second)
    assert (t.n, t.wins, t.losses, t.ties) == (50, 2, 9, 39)
    assert t.difference == pytest.approx((2 - 9) / 50)
    # two-sided exact: 2 P(X <= 2), X ~ Bin(11, 1/2) = 2 (1 + 11 + 55) / 2048
    assert t.p_value == pytest.approx(134 / 2048)
    assert stats.mcnemar(second, first, "greater").p_value == pytest.approx(67 / 2048)


def test_sign_test_drops_ties_and_keeps_the_mean_difference():
    t = stats.sign_test([0.5, 1.0, 0.25, 0.0, 1.0], [0.5, 0.75, 0.5, 0.0, 0.0])
    assert (t.wins, t.losses, t.ties) == (2, 1, 2)
    assert t.p_value == pytest.approx(1.0)
    assert t.difference == pytest.approx((0.25 - 0.25 + 1.0) / 5)


def test_paired_difference_interval_all_discordant_is_twice_a_wilson_interval_minus_one():
    # a = d = 0: p2 = 1 - p1 and phi = -1, so the limits are 2 l1 - 1 and 2 u1 - 1
    first = [True] * 7 + [False] * 3
    second = [not x for x in first]
    ci = stats.paired_difference_interval(first, second)
    w = stats.wilson_interval(7, 10)
    assert ci.low == pytest.approx(2 * w.low - 1, abs=1e-12)
    assert ci.high == pytest.approx(2 * w.high - 1, abs=1e-12)


def test_paired_difference_interval_hand_computed_table():
    # a=12, b=2, c=9, d=27 (n=50): p1=0.28, p2=0.42, phi=(12*27-2*9)/sqrt(14*36*21*29)
    first = [True] * 14 + [False] * 36
    second = [True] * 12 + [False] * 2 + [True] * 9 + [False] * 27
    w1, w2 = stats.wilson_interval(14, 50), stats.wilson_interval(21, 50)
    phi = (12 * 27 - 2 * 9) / math.sqrt(14 * 36 * 21 * 29)
    d1, e1, d2, e2 = 0.28 - w1.low, w1.high - 0.28, 0.42 - w2.low, w2.high - 0.42
    low = -0.14 - math.sqrt(d1 ** 2 - 2 * phi * d1 * e2 + e2 ** 2)
    high = -0.14 + math.sqrt(e1 ** 2 - 2 * phi * e1 * d2 + d2 ** 2)
    ci = stats.paired_difference_interval(first, second)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert ci.low < -0.14 < ci.high


def test_paired_difference_interval_is_symmetric_when_the_accuracies_are_equal():
    first = [True, True, False, False, True, False, True, False]
    second = [True, False, True, False, True, True, False, False]
    ci = stats.paired_difference_interval(first, second)
    assert ci.low == pytest.approx(-ci.high, abs=1e-12)
    assert ci.low < 0 < ci.high


def test_holm_adjusts_step_down_and_keeps_input_order():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_fraction_of_a_zero_reference_is_none():
    assert stats.fraction_of(0.45, 0.5) == pytest.approx(0.9)
    assert stats.fraction_of(0.1, 0.0) is None


@pytest.mark.parametrize("call, match", [
    (lambda: stats.wilson_interval(3, 0), "n must be an int >= 1"),
    (lambda: stats.wilson_interval(4, 3), r"successes \(4\) must be at most n \(3\)"),
    (lambda: stats.wilson_interval(1, 3, confidence=95), "confidence must be a number in"),
    (lambda: stats.binomial_test(1, 3, "bigger"), "alternative must be one of"),
    (lambda: stats.mcnemar([True], [True, False]), "lengths 1 and 2"),
    (lambda: stats.mcnemar([0.5], [1]), "right/wrong outcomes"),
    (lambda: stats.proportion([]), "empty"),
    (lambda: stats.sign_test([float("nan")], [0.0]), "finite numbers"),
    (lambda: stats.holm([0.2, 1.5]), r"in \[0, 1\]"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
