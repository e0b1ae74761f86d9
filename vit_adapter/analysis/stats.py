"""Small, dependency-free statistics for seed-paired comparisons: Student-t quantiles, t-intervals, bootstrap.

scipy is not a dependency, and ``torch.distributions.StudentT.icdf`` is not implemented, so the t quantile is
computed here: the t CDF through the regularised incomplete beta function (continued fraction, as in Numerical
Recipes §6.4), inverted by bisection to machine precision. Closed forms check it: t_{0.975,1} = tan(0.475π) =
12.7062, t_{0.975,2} = 0.95 / sqrt(2·0.975·0.025) = 4.3027.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_MIN_N = 10  # below this many pairs a t-interval; from here on a percentile bootstrap (brief, report)
DEFAULT_N_BOOT = 10_000
DEFAULT_BOOT_SEED = 0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
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


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile t_{q,df}: bisection on ``t_cdf`` (monotone), bracket grown until it holds the root."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # 200 halvings of a bracket < 2^60 reach the float resolution
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its confidence interval; lo/hi are NaN when undefined (n < 2)."""

    estimate: float
    lo: float
    hi: float
    n: int
    method: str  # "t", "bootstrap" or "none"

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > 0 or self.hi < 0))


def t_interval(values: np.ndarray, conf: float = 0.95) -> Interval:
    """mean ± t_{(1+conf)/2, n-1} · s / sqrt(n), with s the sample std (ddof=1)."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, "none")
    half = t_ppf(0.5 + conf / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, "t")


def bootstrap_interval(
    values: np.ndarray, conf: float = 0.95, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_BOOT_SEED
) -> Interval:
    """Percentile bootstrap of the mean: ``n_boot`` resamples with replacement from a seeded generator, so the
    interval is a pure function of (values, conf, n_boot, seed)."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - conf) / 2.0, (1.0 + conf) / 2.0])
    return Interval(float(x.mean()), float(lo), float(hi), n, "bootstrap")


def mean_interval(
    values: np.ndarray, conf: float = 0.95, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_BOOT_SEED
) -> Interval:
    """The rule used throughout the report: t-interval below ``BOOTSTRAP_MIN_N`` values, bootstrap from there."""
    x = np.asarray(values, dtype=float)
    if x.size >= BOOTSTRAP_MIN_N:
        return bootstrap_interval(x, conf, n_boot, seed)
    return t_interval(x, conf)
