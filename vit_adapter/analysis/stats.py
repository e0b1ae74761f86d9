"""Statistics for seed-paired comparisons: Student-t quantiles (scipy), t-intervals, a seeded bootstrap.

The t distribution comes from ``scipy.stats.t`` (scipy is a runtime dependency; ``torch.distributions.StudentT``
has no ``icdf``). Closed forms check it: t_{0.975,1} = tan(0.475π) = 12.7062, t_{0.975,2} = 0.95 / sqrt(2·0.975·0.025)
= 4.3027.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

BOOTSTRAP_MIN_N = 10  # below this many pairs a t-interval; from here on a percentile bootstrap (brief, report)
DEFAULT_N_BOOT = 10_000
DEFAULT_BOOT_SEED = 0


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    return float(special.betainc(a, b, x))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return float(sps.t.cdf(t, df))


def t_ppf(q: float, df: float) -> float:
    """Quantile t_{q,df} (the inverse of ``t_cdf``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    return float(sps.t.ppf(q, df))


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


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs whose differences have standard
    deviation ``sd``, against a true mean difference ``effect``: P(|T| > t_{1−α/2, n−1}) with T noncentral t
    (df n − 1, noncentrality effect·√n / sd). NaN when undefined (n < 2, sd not positive, effect NaN)."""
    if n < 2 or not (sd > 0) or not math.isfinite(effect):
        return math.nan
    df = n - 1
    crit = t_ppf(1.0 - alpha / 2.0, df)
    nc = abs(effect) * math.sqrt(n) / sd
    lower = sps.nct.cdf(-crit, df, nc)
    if not math.isfinite(lower):  # scipy's series fails far in this tail (df 1, nc > 7.5); it is <= Φ(−nc) there
        lower = 0.0
    return float(sps.nct.sf(crit, df, nc) + lower)


def min_detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference the paired t-test (``n`` pairs, differences' std ``sd``) detects with
    probability ``power`` at level ``alpha``: the root of ``paired_t_power(effect) = power``. NaN when
    undefined."""
    if n < 2 or not (sd > 0):
        return math.nan
    hi = sd  # grow the bracket until the power is reached (it tends to 1 as the effect grows)
    while paired_t_power(hi, sd, n, alpha) < power:
        hi *= 2.0
    return float(optimize.brentq(lambda e: paired_t_power(e, sd, n, alpha) - power, 0.0, hi, xtol=1e-10))
