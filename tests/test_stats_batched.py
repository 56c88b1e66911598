"""The batched statistics (one numpy/scipy call per sample size) equal the per-cell scipy calls bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from etbench.analysis.stats import CIConfig, compare, mean_ci, mean_ci_many, summarize

MSE = "best/test/mse_masked"
CONFIGS = [CIConfig(), CIConfig(method="t", confidence=0.9), CIConfig(method="BCa", n_resamples=499),
           CIConfig(method="percentile", n_resamples=499, seed=3), CIConfig(method="basic", n_resamples=299)]


def _samples() -> list[np.ndarray]:
    """Every n from 0 to 24 (t below 10, BCa from 10), with a NaN, with ties, constant, and spread over scales."""
    rng = np.random.default_rng(7)
    out = []
    for n in range(25):
        for kind in range(4):
            x = rng.normal(size=n) * 10.0 ** int(rng.integers(-4, 4))
            if kind == 1 and n:
                x[rng.integers(0, n)] = np.nan
            elif kind == 2:
                x = np.round(x, 1)
            elif kind == 3:
                x = np.full(n, 0.3)
            out.append(x)
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-{c.confidence}")
def test_mean_ci_many_equals_mean_ci_exactly(cfg: CIConfig) -> None:
    samples = _samples()
    want = pd.DataFrame([mean_ci(x, cfg) for x in samples])
    got = mean_ci_many(samples, cfg)
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)
    assert set(got["interval"]) >= ({"none", "t"} if cfg.method in ("auto", "t") else {"none", cfg.method})


def test_mean_ci_many_batches_large_bootstraps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows split over several bootstrap calls (memory cap) give the same numbers as one call per sample."""
    from etbench.analysis import stats as stats_mod

    cfg = CIConfig(method="BCa", n_resamples=199)
    monkeypatch.setattr(stats_mod, "BOOTSTRAP_BATCH_VALUES", 199 * 12 * 3)  # 3 rows of n = 12 per call
    samples = list(np.random.default_rng(1).normal(size=(8, 12)))
    want = pd.DataFrame([mean_ci(x, cfg) for x in samples])
    pd.testing.assert_frame_equal(mean_ci_many(samples, cfg), want, check_exact=True, check_dtype=False)


def _runs(seeds: int, cells: int = 3) -> pd.DataFrame:
    """et and vit over a memories axis (et only) and lr, ``seeds`` seeds, some values tied, one missing."""
    rng = np.random.default_rng(seeds)
    rows = []
    for model in ("et", "vit"):
        for lr in (0.001, 0.002):
            for mem in (range(cells) if model == "et" else [None]):
                for s in range(seeds):
                    value = round(float(rng.normal(0.5, 0.05)), 2 if s % 3 == 0 else 6)
                    rows.append({"dataset": "digits", "protocol": "masked-completion", "model": model,
                                 "task": "image", "split": -1, "seed": s, "paper_comparable": False,
                                 "axis.model.memories": mem, "axis.train.lr": lr, "metrics." + MSE: value})
    frame = pd.DataFrame(rows)
    frame.loc[3, "metrics." + MSE] = np.nan
    frame[["split", "seed"]] = frame[["split", "seed"]].astype("Int64")
    frame["axis.model.memories"] = frame["axis.model.memories"].astype("Int64")
    return frame


AXES = ["axis.model.memories", "axis.train.lr"]


@pytest.mark.parametrize("seeds", [5, 12])
def test_summarize_equals_mean_ci_per_cell(seeds: int) -> None:
    runs = _runs(seeds)
    table = summarize(runs, MSE, AXES, cfg=CIConfig(n_resamples=499), complete=False)
    assert len(table) == 8
    for _, row in table.iterrows():
        mem = runs["axis.model.memories"]
        cell = runs[(runs["model"] == row["model"]) & (runs["axis.train.lr"] == row["axis.train.lr"])
                    & (mem.isna() if pd.isna(row["axis.model.memories"]) else mem == row["axis.model.memories"])]
        want = mean_ci(cell["metrics." + MSE].to_numpy(float), CIConfig(n_resamples=499))
        for key, value in want.items():
            assert row[key] == value or (pd.isna(row[key]) and pd.isna(value)), key


@pytest.mark.parametrize("seeds", [5, 12])
def test_compare_equals_scipy_per_pair(seeds: int) -> None:
    """Each row against its own pair: mean_ci of the differences, d_z, ttest_rel and (n ≥ 6) Wilcoxon."""
    runs = _runs(seeds)
    cfg = CIConfig(n_resamples=499)
    table = compare(runs, MSE, AXES, cfg=cfg)
    assert len(table) == 6  # 3 memories × 2 lr, each against the ViT of its lr
    value = "metrics." + MSE
    for _, row in table.iterrows():
        ref = runs[(runs["model"] == "et") & (runs["axis.model.memories"] == row["axis.model.memories"])
                   & (runs["axis.train.lr"] == row["axis.train.lr"])].set_index("seed")[value]
        base = runs[(runs["model"] == "vit") & (runs["axis.train.lr"] == row["axis.train.lr"])].set_index("seed")[value]
        pair = pd.concat([ref.rename("r"), base.rename("b")], axis=1).dropna()
        r, b = pair["r"].to_numpy(float), pair["b"].to_numpy(float)
        ci = mean_ci(r - b, cfg)
        assert row["n"] == ci["n"] and row["interval"] == ci["interval"]
        for got, want in ((row["mean_diff"], ci["mean"]), (row["ci_low"], ci["ci_low"]),
                          (row["ci_high"], ci["ci_high"]), (row["std_diff"], ci["std"])):
            assert got == want
        assert row["d_z"] == ci["mean"] / ci["std"]
        assert row["p_ttest"] == float(stats.ttest_rel(r, b).pvalue)
        if len(r) >= 6:
            assert row["p_wilcoxon"] == float(stats.wilcoxon(r, b).pvalue)
        else:
            assert np.isnan(row["p_wilcoxon"])
    if seeds == 12:
        assert (table["interval"] == "BCa").any() and table["p_wilcoxon"].notna().all()
