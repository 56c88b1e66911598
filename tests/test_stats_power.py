"""Minimum detectable effect of the paired t-test and TOST equivalence, against independent computations:
power by numerical integration over the chi-square of the variance, a Monte-Carlo of the test itself, the
normal-approximation closed form at large n, and scipy's one-sample t-tests on the raw differences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from etbench.analysis.power import mde_dz, paired_power, power_columns, tost


def _power_by_integration(d_z: float, n: int, alpha: float) -> float:
    """P(|Z + d_z√n| > c·√(V/df)) with Z normal and V chi-square(df): the paired t-test's power, no noncentral t."""
    df, nc = n - 1, d_z * math.sqrt(n)
    c = stats.t.ppf(1 - alpha / 2, df)

    def reject(v: float) -> float:
        edge = c * math.sqrt(v / df)
        return (stats.norm.sf(edge - nc) + stats.norm.cdf(-edge - nc)) * stats.chi2.pdf(v, df)

    return integrate.quad(reject, 0, np.inf, epsabs=1e-12, limit=200)[0]


@pytest.mark.parametrize("n", [2, 3, 5, 10, 30])
@pytest.mark.parametrize(("alpha", "power"), [(0.05, 0.8), (0.01, 0.9)])
def test_power_at_the_mde_is_the_target_power(n: int, alpha: float, power: float) -> None:
    d = mde_dz(n, alpha, power)
    assert _power_by_integration(d, n, alpha) == pytest.approx(power, abs=1e-6)
    assert _power_by_integration(0.98 * d, n, alpha) < power  # the smallest such effect


def test_monte_carlo_paired_t_test_rejects_at_the_mde_with_80_percent() -> None:
    n, draws = 5, 40_000
    d = mde_dz(n)
    rng = np.random.default_rng(7)
    diffs = rng.normal(d, 1.0, size=(draws, n))
    rate = float((stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean())
    assert rate == pytest.approx(0.80, abs=0.01)  # 5 binomial sd


def test_large_n_matches_the_normal_closed_form_and_mde_falls_with_n() -> None:
    n = 4000
    closed = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(n)
    assert mde_dz(n) == pytest.approx(closed, rel=1e-3)
    ds = [mde_dz(k) for k in (2, 3, 5, 10, 15, 30)]
    assert all(a > b for a, b in itertools.pairwise(ds))
    assert math.isnan(mde_dz(1))
    assert mde_dz(5) * 0.0081 == pytest.approx(0.0136, abs=1e-4)  # science-2 C4: vit-tied, sd 0.0081, n = 5
    assert paired_power(0.0, 10) == pytest.approx(0.05)  # no effect: rejects at the level
    with pytest.raises(ValueError, match="alpha"):
        mde_dz(5, 0.05, 0.04)


def _scipy_tost(d: np.ndarray, margin: float) -> float:
    low = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    high = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(low, high))


CASES = {  # differences, margin, known verdict
    "tight around zero": (np.array([0.001, -0.002, 0.0005, 0.0015, -0.001]), 0.01, True),
    "clearly outside": (np.array([0.020, 0.025, 0.018, 0.022, 0.021]), 0.01, False),
    "noisy, underpowered": (np.array([0.02, -0.03, 0.01, -0.015, 0.012]), 0.01, False),
    "different yet equivalent": (np.array([0.0030, 0.0032, 0.0029, 0.0031, 0.0030]), 0.01, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tost_against_scipy_one_sided_tests(name: str) -> None:
    d, margin, verdict = CASES[name]
    p, equivalent = tost(float(d.mean()), float(d.std(ddof=1)), d.size, margin)
    assert p == pytest.approx(_scipy_tost(d, margin), rel=1e-9, abs=1e-15)
    assert equivalent is verdict


def test_tost_is_the_90_percent_interval_inside_the_margin() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        d = rng.normal(rng.uniform(-0.02, 0.02), rng.uniform(0.002, 0.02), size=int(rng.integers(3, 12)))
        low, high = stats.t.interval(0.90, d.size - 1, loc=d.mean(), scale=stats.sem(d))
        assert tost(float(d.mean()), float(d.std(ddof=1)), d.size, 0.01)[1] == (-0.01 < low and high < 0.01)


def test_tost_edges() -> None:
    assert tost(0.002, 0.0, 5, 0.01) == (0.0, True) and tost(0.02, 0.0, 5, 0.01) == (1.0, False)
    p, eq = tost(0.0, 0.01, 1, 0.01)
    assert math.isnan(p) and not eq
    with pytest.raises(ValueError, match="margin"):
        tost(0.0, 0.01, 5, 0.0)


def test_power_columns_adds_mde_and_tost_only_where_a_margin_is_declared() -> None:
    d = CASES["tight around zero"][0]
    table = pd.DataFrame({"metric": ["m", "other", "m"], "n": [5, 5, 1], "mean_diff": [d.mean(), 0.1, 0.2],
                          "std_diff": [d.std(ddof=1), 0.05, math.nan]})
    out = power_columns(table, margins={"m": 0.01})
    assert list(out["mde_dz"][:2]) == pytest.approx([mde_dz(5)] * 2) and math.isnan(out["mde_dz"].iloc[2])
    assert out["mde"].iloc[1] == pytest.approx(mde_dz(5) * 0.05)
    assert out["p_tost"].iloc[0] == pytest.approx(_scipy_tost(d, 0.01)) and out["equivalent"].iloc[0]
    assert math.isnan(out["p_tost"].iloc[1]) and not out["equivalent"].iloc[1]  # no margin for "other"
    assert math.isnan(out["p_tost"].iloc[2])  # one pair: no test


def _two_baseline_runs() -> pd.DataFrame:
    """et against vit (clearly better) and vit-tied (tiny, noisy difference) on 5 paired seeds."""
    base = np.array([0.50, 0.52, 0.49, 0.51, 0.50])
    diffs = {"vit": np.array([-0.10, -0.11, -0.09, -0.10, -0.12]),
             "vit-tied": np.array([0.004, -0.003, 0.002, -0.001, 0.003])}
    values = {"et": base, **{b: base - d for b, d in diffs.items()}}
    rows = [{"dataset": "digits", "protocol": "masked-completion", "model": m, "task": "image", "split": -1,
             "seed": s, "paper_comparable": False, "metrics.best/test/mse_masked": v[s]}
            for m, v in values.items() for s in range(5)]
    runs = pd.DataFrame(rows)
    runs[["split", "seed"]] = runs[["split", "seed"]].astype("Int64")
    return runs


def test_comparison_table_prints_the_mde_beside_no_difference_and_tost_where_a_margin_is_declared() -> None:
    from etbench.analysis import tables

    metric = "best/test/mse_masked"
    d = np.array([0.004, -0.003, 0.002, -0.001, 0.003])
    (plain,) = tables.comparison_tables(_two_baseline_runs(), [metric])
    assert "TOST (equivalence)" not in plain.display.columns
    (table,) = tables.comparison_tables(_two_baseline_runs(), [metric], margins={metric: 0.01})
    shown = table.display.set_index("baseline")
    data = table.data.set_index("baseline")
    assert data.loc["vit", "favours"] == "et" and shown.loc["vit", "MDE (80% power)"] == "–"
    assert data.loc["vit-tied", "favours"] == "no difference shown"
    mde = mde_dz(5) * d.std(ddof=1)
    assert data.loc["vit-tied", "mde"] == pytest.approx(mde)
    assert shown.loc["vit-tied", "MDE (80% power)"] == f"{mde:.2g}, d_z {mde_dz(5):.2f}"
    assert data.loc["vit-tied", "p_tost"] == pytest.approx(_scipy_tost(d, 0.01))
    assert shown.loc["vit-tied", "TOST (equivalence)"].startswith("equivalent within ±0.01")
    assert shown.loc["vit", "TOST (equivalence)"].startswith("not shown equivalent")  # Δ ≈ −0.1 ≫ margin
    assert "minimum detectable effect" in table.caption and "TOST" in table.caption
