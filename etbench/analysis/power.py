"""Power of the paired comparisons: the minimum detectable effect, and equivalence by TOST.

"No difference shown" from a handful of seeds says little unless the study could have detected a difference worth
caring about. For the two-sided paired t-test at the n used, :func:`mde_dz` is the smallest standardised effect
d_z = mean / sd of the differences detected with the given power, exact through the noncentral t distribution;
multiplied by the sd of the differences it is in the metric's units. Given an equivalence margin, :func:`tost` runs
the two one-sided paired t-tests (Schuirmann 1987): equivalence within ±margin is shown when both reject at α,
i.e. when the (1 − 2α) confidence interval of the mean difference lies inside the margin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import optimize, stats


def _check(alpha: float, power: float) -> None:
    if not 0 < alpha < power < 1:
        raise ValueError(f"need 0 < alpha ({alpha}) < power ({power}) < 1")


def paired_power(d_z: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test of n pairs at level ``alpha`` when the true effect is ``d_z``: the
    statistic is noncentral t with n − 1 degrees of freedom and noncentrality d_z·√n. The lower tail is taken as
    the upper tail at −d_z (scipy's ``nct.cdf`` far in the left tail gives NaN)."""
    df, nc = n - 1, d_z * math.sqrt(n)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


@lru_cache(maxsize=256)
def mde_dz(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The minimum detectable d_z of the two-sided paired t-test of n pairs (NaN below two pairs): the root of
    :func:`paired_power` = ``power``, which rises monotonically from ``alpha`` at d_z = 0."""
    _check(alpha, power)
    if n < 2:
        return math.nan
    high = 1.0
    while paired_power(high, n, alpha) < power:
        high *= 2.0
    return float(optimize.brentq(lambda d: paired_power(d, n, alpha) - power, 0.0, high, xtol=1e-12))


def tost(mean: float, sd: float, n: int, margin: float, alpha: float = 0.05) -> tuple[float, bool]:
    """TOST p-value (the larger of the two one-sided paired t p) and verdict for equivalence of a mean paired
    difference within ±``margin`` (metric units), from the differences' mean, sd (ddof = 1) and count n.

    H0₁: μ ≤ −margin, rejected for large t₁ = (mean + margin)/(sd/√n); H0₂: μ ≥ margin, rejected for small
    t₂ = (mean − margin)/(sd/√n); both with n − 1 degrees of freedom. Differences without spread are
    equivalent exactly when |mean| < margin. Below two pairs: NaN, not shown."""
    if not margin > 0:
        raise ValueError(f"equivalence margin {margin} must be > 0")
    if n < 2 or not math.isfinite(mean):
        return math.nan, False
    if not sd > 0:
        p = 0.0 if abs(mean) < margin else 1.0
    else:
        se = sd / math.sqrt(n)
        p = max(float(stats.t.sf((mean + margin) / se, n - 1)), float(stats.t.cdf((mean - margin) / se, n - 1)))
    return p, p < alpha


def power_columns(table: pd.DataFrame, alpha: float = 0.05, power: float = 0.8,
                  margins: Mapping[str, float] | None = None) -> pd.DataFrame:
    """``table`` (rows of :func:`etbench.analysis.stats.compare`: n, mean_diff, std_diff, metric) with ``mde_dz``
    and ``mde`` (= mde_dz × std_diff, metric units) at two-sided ``alpha`` before any multiplicity adjustment,
    and, for each metric with an entry in ``margins`` (metric name → equivalence margin, metric units),
    ``margin``, ``p_tost`` and ``equivalent`` (NaN / False elsewhere)."""
    _check(alpha, power)
    out = table.copy()
    n = out["n"].to_numpy().astype(int)
    out["mde_dz"] = np.array([mde_dz(int(k), alpha, power) for k in n], dtype=float)
    out["mde"] = out["mde_dz"] * out["std_diff"].to_numpy(float)
    margin = np.array([(margins or {}).get(str(m), math.nan) for m in out["metric"]], dtype=float)
    tested = [tost(float(a), float(s), int(k), float(g), alpha) if math.isfinite(g) else (math.nan, False)
              for a, s, k, g in zip(out["mean_diff"], out["std_diff"], n, margin, strict=True)]
    out["margin"] = margin
    out["p_tost"] = np.array([p for p, _ in tested], dtype=float)
    out["equivalent"] = np.array([e for _, e in tested], dtype=bool)
    return out
