"""The two-level (seed × test item) paired bootstrap (issue 27.4) against exact and closed-form oracles: the whole
bootstrap distribution by enumerating every equally likely resample of a tiny case, the bootstrap variance's closed
form for each design, the ordinary item bootstrap at one seed (scipy), the seed bootstrap at identical items, and
the population variance of a synthetic seed + item + noise model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from etbench.analysis.item_bootstrap import bootstrap_means, item_bootstrap_ci, paired_differences

TINY = np.array([[0.10, -0.05, 0.30], [0.02, 0.20, -0.12]])  # 2 seeds × 3 items


def _exact(d: np.ndarray, design: str) -> pd.Series:
    """P(replicate value) over every equally likely resample: seeds and items drawn as indices with replacement."""
    s, n = d.shape
    values = []
    for seeds in itertools.product(range(s), repeat=s):
        if design == "crossed":  # one item draw shared by the drawn seeds
            values += [d[np.ix_(seeds, items)].mean() for items in itertools.product(range(n), repeat=n)]
        else:  # each drawn seed its own item draw
            per_slot = [[d[j, list(items)].mean() for items in itertools.product(range(n), repeat=n)] for j in seeds]
            values += [float(np.mean(c)) for c in itertools.product(*per_slot)]
    return pd.Series(np.round(values, 10)).value_counts(normalize=True).sort_index()


@pytest.mark.parametrize("design", ["crossed", "nested"])
def test_the_whole_distribution_matches_enumeration(design: str) -> None:
    exact = _exact(TINY, design)
    reps = pd.Series(np.round(bootstrap_means(TINY, design=design, n_resamples=200_000, seed=1), 10))
    assert set(reps.unique()) <= set(exact.index)  # only values a resample can take
    drawn = reps.value_counts(normalize=True).reindex(exact.index, fill_value=0.0)
    assert float((drawn.cumsum() - exact.cumsum()).abs().max()) < 0.006  # KS distance; 95 % band ≈ 0.003
    values = exact.index.to_numpy(float)
    mean, var = float((values * exact).sum()), float((values**2 * exact).sum() - (values * exact).sum() ** 2)
    assert reps.mean() == pytest.approx(mean, abs=3 * math.sqrt(var / len(reps)))
    assert reps.var() == pytest.approx(var, rel=0.02)


def _crossed_variance(d: np.ndarray) -> float:
    """Owen (2007): σ²_rows/S + σ²_cols/N + σ²_interaction/(SN), population (ddof 0) variances of the two-way
    decomposition of the data."""
    s, n = d.shape
    g, rows, cols = d.mean(), d.mean(axis=1), d.mean(axis=0)
    inter = d - rows[:, None] - cols[None, :] + g
    return float(((rows - g) ** 2).mean() / s + ((cols - g) ** 2).mean() / n + (inter**2).mean() / (s * n))


def _nested_variance(seeds: list[np.ndarray]) -> float:
    """(1/S)·(variance of the seed means + mean over seeds of the within-seed variance / N_s), ddof 0."""
    means = np.array([x.mean() for x in seeds])
    return float((means.var() + np.mean([x.var() / x.size for x in seeds])) / len(seeds))


def test_bootstrap_variance_matches_each_designs_closed_form() -> None:
    rng = np.random.default_rng(11)
    d = rng.normal(0.01, 0.02, size=(6, 1)) + rng.normal(0, 0.05, size=(1, 80)) + rng.normal(0, 0.1, size=(6, 80))
    crossed = bootstrap_means(d, design="crossed", n_resamples=40_000, seed=2)
    assert crossed.var() == pytest.approx(_crossed_variance(d), rel=0.03)  # sd of a variance estimate: 0.7 %
    ragged = [d[0], d[1, :50], d[2, :65], d[3], d[4, :30], d[5]]
    nested = bootstrap_means(ragged, design="nested", n_resamples=40_000, seed=2)
    assert nested.var() == pytest.approx(_nested_variance(ragged), rel=0.03)
    assert crossed.mean() == pytest.approx(d.mean(), abs=4 * crossed.std() / 200)
    # the item effect is shared by every seed: only the crossed design keeps its full share, 0.05²/80
    assert _crossed_variance(d) > 1.3 * _nested_variance(list(d))


def test_one_seed_is_the_ordinary_paired_item_bootstrap() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(0.30, 0.05, size=200)
    b = a + rng.normal(0.004, 0.02, size=200)
    d = a - b
    ours = item_bootstrap_ci([d], n_resamples=40_000, seed=3)
    ref = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=40_000, method="percentile",
                          random_state=np.random.default_rng(4)).confidence_interval
    width = ref.high - ref.low
    assert ours.ci_low == pytest.approx(ref.low, abs=0.03 * width)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.03 * width)
    assert ours.mean == pytest.approx(d.mean()) and (ours.n_seeds, ours.n_items) == (1, 200)
    nested = item_bootstrap_ci([d], design="nested", n_resamples=40_000, seed=3)
    assert nested.ci_low == pytest.approx(ref.low, abs=0.03 * width)


def test_identical_items_leave_the_seed_bootstrap_and_identical_everything_collapses() -> None:
    flat = np.full((4, 30), 0.0125)
    for design in ("crossed", "nested"):
        ci = item_bootstrap_ci(flat, design=design, n_resamples=2000)
        assert ci.ci_low == pytest.approx(0.0125, abs=1e-15) and ci.ci_high == pytest.approx(0.0125, abs=1e-15)
        assert ci.mean == pytest.approx(0.0125)
    seed_means = np.array([0.01, -0.02, 0.03])
    same_items = np.repeat(seed_means[:, None], 25, axis=1)
    exact = pd.Series([np.round(seed_means[list(s)].mean(), 10) for s in itertools.product(range(3), repeat=3)])
    exact = exact.value_counts(normalize=True).sort_index()
    for design in ("crossed", "nested"):
        reps = pd.Series(np.round(bootstrap_means(same_items, design=design, n_resamples=50_000, seed=9), 10))
        drawn = reps.value_counts(normalize=True).reindex(exact.index, fill_value=0.0)
        assert set(reps.unique()) <= set(exact.index)
        assert float((drawn - exact).abs().max()) < 0.01


def _expected_crossed_variance(s: int, n: int, tau: float, omega: float, sigma: float) -> float:
    """E[the crossed bootstrap's variance] under d = μ + u_seed + v_item + e: the expected row, column and
    interaction variances (ddof 0) put into the closed form (each level's spread carries the noise below it)."""
    rows = (s - 1) / s * (tau**2 + sigma**2 / n)
    cols = (n - 1) / n * (omega**2 + sigma**2 / s)
    inter = (s - 1) * (n - 1) / (s * n) * sigma**2
    return rows / s + cols / n + inter / (s * n)


@pytest.mark.parametrize(("sigma", "conservative"), [(0.1, False), (0.8, True)])
def test_ci_width_of_a_known_variance_model_matches_the_analytic_one(sigma: float, conservative: bool) -> None:
    """d = μ + u_seed + v_item + e, u ~ N(0, τ²), v ~ N(0, ω²), e ~ N(0, σ²), items shared by the seeds: the mean
    of S × N has variance τ²/S + ω²/N + σ²/(SN). With a small interaction (σ = 0.1) the interval has that width;
    with σ²/(SN) as large as the other two terms together (σ = 0.8) it is conservative, as its expectation says."""
    s, n, tau, omega = 40, 400, 0.02, 0.09
    rng = np.random.default_rng(21)
    d = 0.01 + rng.normal(0, tau, (s, 1)) + rng.normal(0, omega, (1, n)) + rng.normal(0, sigma, (s, n))
    ci = item_bootstrap_ci(d, n_resamples=20_000, seed=0)
    z2 = 2 * stats.norm.ppf(0.975)
    true = z2 * math.sqrt(tau**2 / s + omega**2 / n + sigma**2 / (s * n))
    expected = z2 * math.sqrt(_expected_crossed_variance(s, n, tau, omega, sigma))
    width = ci.ci_high - ci.ci_low
    assert width == pytest.approx(expected, rel=0.1)
    if conservative:
        assert width > 1.2 * true
    else:
        assert width == pytest.approx(true, rel=0.1)
        seeds_only = z2 * d.mean(axis=1).std(ddof=1) / math.sqrt(s)  # the report's interval today: seeds only
        assert seeds_only < 0.8 * true


def test_deterministic_by_seed_and_input_contract() -> None:
    d = np.random.default_rng(0).normal(size=(3, 40))
    assert np.array_equal(bootstrap_means(d, seed=7, n_resamples=3000), bootstrap_means(d, seed=7, n_resamples=3000))
    assert not np.array_equal(bootstrap_means(d, seed=7, n_resamples=3000),
                              bootstrap_means(d, seed=8, n_resamples=3000))
    with pytest.raises(ValueError, match="crossed design: every seed must score the same items"):
        bootstrap_means([d[0], d[1, :10]])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_means([[0.1, np.nan]])
    with pytest.raises(ValueError, match="design 'both'"):
        bootstrap_means(d, design="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_means([])


def test_paired_differences_from_a_long_frame() -> None:
    rows = [{"seed": s, "item": i, "model": m, "value": 10 * s + i + (0.5 if m == "et" else 0.0)}
            for s in (1, 0) for i in (2, 0, 1) for m in ("vit", "et")]
    diffs = paired_differences(pd.DataFrame(rows), "et", "vit")
    assert len(diffs) == 2 and all(np.allclose(x, 0.5) for x in diffs)
    with pytest.raises(ValueError, match="1 \\(seed, item\\) pairs lack one model's value \\(first: seed 0 item 1\\)"):
        paired_differences(pd.DataFrame(rows[:-1]), "et", "vit")  # the last row: seed 0, item 1, et
    with pytest.raises(ValueError, match="no per-item values of model 'gcn'"):
        paired_differences(pd.DataFrame(rows), "et", "gcn")
