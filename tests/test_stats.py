"""scipy-backed statistics against the hand-written formulas they replaced (kept here as the yardstick).

The report's confidence intervals must not move beyond float noise when the t quantile comes from scipy: the
old implementation (incomplete beta by continued fraction, t quantile by bisection) is copied below verbatim in
substance and compared at 1e-10 relative over the degrees of freedom and levels the report can use.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vit_adapter.analysis import stats

# ---------------------------------------------------------------------------------------------------------
# The previous implementation (vit_adapter/analysis/stats.py before scipy), the yardstick.


def _old_betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _old_betainc(a: float, b: float, x: float) -> float:
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _old_betacf(a, b, x) / a
    return 1.0 - front * _old_betacf(b, a, 1.0 - x) / b


def _old_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _old_betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _old_t_ppf(q: float, df: float) -> float:
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -_old_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while _old_t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _old_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _old_t_interval(values: np.ndarray, conf: float) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    half = _old_t_ppf(0.5 + conf / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------------------

REL = 1e-10
DFS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 50, 100, 1000]
LEVELS = [0.5, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 0.05, 0.1, 0.005]


@pytest.mark.parametrize("df", DFS)
def test_t_ppf_matches_the_old_bisection(df: int) -> None:
    for q in LEVELS:
        assert stats.t_ppf(q, df) == pytest.approx(_old_t_ppf(q, df), rel=REL, abs=1e-300), (q, df)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 30, 2.5])
def test_t_cdf_matches_the_old_continued_fraction(df: float) -> None:
    for t in [-50.0, -12.7, -4.3, -2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 4.3, 12.7, 50.0]:
        assert stats.t_cdf(t, df) == pytest.approx(_old_t_cdf(t, df), rel=REL), (t, df)
    assert stats.t_cdf(0.0, df) == 0.5


def test_betainc_matches_the_old_continued_fraction() -> None:
    for a in [0.5, 1.0, 2.5, 4.5, 50.0]:
        for b in [0.5, 1.0, 3.0]:
            for x in [0.0, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0]:
                assert stats.betainc(a, b, x) == pytest.approx(_old_betainc(a, b, x), rel=REL, abs=1e-300)


@pytest.mark.parametrize("n", [2, 3, 5, 9])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_t_interval_is_unchanged(n: int, conf: float) -> None:
    x = np.random.default_rng(n).normal(1.5, 2.0, size=n)
    got = stats.t_interval(x, conf)
    mean, lo, hi = _old_t_interval(x, conf)
    assert got.method == "t" and got.n == n and got.estimate == mean
    assert got.lo == pytest.approx(lo, rel=REL) and got.hi == pytest.approx(hi, rel=REL)
    assert stats.mean_interval(x, conf) == got  # below BOOTSTRAP_MIN_N the report's rule is the t-interval


def test_argument_checks_are_kept() -> None:
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        stats.t_ppf(1.0, 3)
    with pytest.raises(ValueError, match="positive"):
        stats.t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="positive"):
        stats.t_ppf(0.9, -1)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        stats.betainc(1.0, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------------------
# Power of the paired t-test (the report's "what this run can resolve")


def test_paired_t_power_against_a_monte_carlo_of_the_test() -> None:
    """The noncentral-t power equals the rejection rate of the test simulated on normal differences."""
    rng = np.random.default_rng(0)
    n, sd, effect = 4, 1.0, 1.5
    x = rng.normal(effect, sd, size=(200_000, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    rate = float(np.mean(np.abs(t) > stats.t_ppf(0.975, n - 1)))
    assert stats.paired_t_power(effect, sd, n) == pytest.approx(rate, abs=0.005)


def test_power_limits_and_minimum_detectable_effect() -> None:
    assert stats.paired_t_power(0.0, 1.0, 5) == pytest.approx(0.05, abs=1e-12)  # no effect: the test's size
    assert stats.paired_t_power(-2.0, 1.0, 5) == stats.paired_t_power(2.0, 1.0, 5)  # two-sided
    assert stats.paired_t_power(50.0, 1.0, 5) == pytest.approx(1.0)
    assert math.isnan(stats.paired_t_power(1.0, 1.0, 1)) and math.isnan(stats.paired_t_power(1.0, 0.0, 4))
    mde = stats.min_detectable_effect(2.0, 4)
    assert stats.paired_t_power(mde, 2.0, 4) == pytest.approx(0.8, abs=1e-8)
    assert stats.min_detectable_effect(4.0, 4) == pytest.approx(2 * mde)  # linear in the std
    assert stats.min_detectable_effect(2.0, 16) < mde  # more pairs resolve smaller effects
    assert math.isnan(stats.min_detectable_effect(1.0, 1))


def test_power_and_mde_are_finite_with_two_pairs() -> None:
    """With 2 pairs (df 1) scipy's noncentral t returns NaN for the lower tail beyond nc ≈ 7.5; the power is then
    the upper tail (the lower one is below Φ(−nc) < 1e-13), and the MDE root search stays finite."""
    from vit_adapter.analysis.stats import min_detectable_effect, paired_t_power

    p = paired_t_power(7.53 / math.sqrt(2), 1.0, 2)
    assert math.isfinite(p) and 0.4 < p < 0.5
    assert math.isfinite(min_detectable_effect(0.5, 2)) and min_detectable_effect(0.5, 2) > 0
