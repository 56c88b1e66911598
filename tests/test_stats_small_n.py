"""Intervals at the n this suite has, Holm-corrected comparisons and effect sizes, against hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from etbench.analysis import tables
from etbench.analysis.metrics import primary_metric
from etbench.analysis.stats import SECONDARY, CIConfig, compare, holm, mean_ci, summarize

MSE, PSNR = "best/test/mse_masked", "best/test/psnr"


@pytest.mark.parametrize("n", [3, 4, 6, 9])
def test_below_ten_is_student_t(n: int) -> None:
    x = np.random.default_rng(n).normal(0.3, 0.05, n)
    got = mean_ci(x)
    want = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert got["interval"] == "t" and (got["ci_low"], got["ci_high"]) == pytest.approx(want, rel=1e-12)
    # 90 % confidence is honoured too
    low, high = stats.t.interval(0.9, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean_ci(x, CIConfig(confidence=0.9))["ci_low"] == pytest.approx(low)
    assert mean_ci(x, CIConfig(confidence=0.9))["ci_high"] == pytest.approx(high)


def test_from_ten_is_bca_bootstrap() -> None:
    x = np.random.default_rng(1).gamma(2.0, 1.0, 12)
    cfg = CIConfig(n_resamples=999, seed=5)
    got = mean_ci(x, cfg)
    ref = stats.bootstrap((x,), np.mean, n_resamples=999, method="BCa", rng=np.random.default_rng(5))
    assert got["interval"] == "BCa"
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((ref.confidence_interval.low,
                                                              ref.confidence_interval.high))
    t_low, _ = stats.t.interval(0.95, 11, loc=x.mean(), scale=stats.sem(x))
    assert got["ci_low"] != pytest.approx(t_low)  # really the bootstrap, not t


def test_one_and_two_values_get_no_interval_and_say_so() -> None:
    one, two = mean_ci([0.3]), mean_ci([0.45, 0.4516])
    assert one["n"] == 1 and np.isnan(one["ci_low"]) and one["interval"] == "none"
    assert two["n"] == 2 and np.isnan(two["ci_low"]) and np.isnan(two["ci_high"]) and two["interval"] == "none"
    assert two["std"] == pytest.approx(np.std([0.45, 0.4516], ddof=1))
    assert tables.fmt_mean_ci(0.3, np.nan, 1) == "0.3 (n=1)"
    assert tables.fmt_mean_ci(0.4508, np.nan, 2) == "0.4508 (n=2: no reliable interval)"
    # configurable: allow an interval from n = 2 (Student t with one degree of freedom)
    x = np.array([0.45, 0.4516])
    cfg = CIConfig(reliable_min_n=2)
    assert (mean_ci(x, cfg)["ci_low"], mean_ci(x, cfg)["ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 1, loc=x.mean(), scale=stats.sem(x)))
    # forcing a bootstrap method keeps it at every n ≥ reliable_min_n
    assert mean_ci(np.arange(4.0), CIConfig(method="percentile", n_resamples=200))["interval"] == "percentile"
    with pytest.raises(ValueError, match="method"):
        CIConfig(method="bootstrap")
    with pytest.raises(ValueError, match="reliable_min_n"):
        CIConfig(reliable_min_n=1)


def _runs(values: dict[str, list[float]], metric: str = MSE) -> pd.DataFrame:
    rows = [{"dataset": "digits", "protocol": "masked-completion", "model": m, "task": "image", "split": -1,
             "seed": s, "paper_comparable": False, "metrics." + metric: v}
            for m, vs in values.items() for s, v in enumerate(vs)]
    frame = pd.DataFrame(rows)
    frame[["split", "seed"]] = frame[["split", "seed"]].astype("Int64")
    return frame


def test_two_seed_table_cell_flags_no_interval_and_caption_states_method() -> None:
    runs = _runs({"et": [0.4510, 0.4516], "vit": [0.50, 0.52]})
    (table,) = tables.results_tables(runs, [MSE])
    cells = list(table.display["test mse_masked"])
    assert all("n=2: no reliable interval" in c and "±" not in c for c in cells), cells
    assert "Student t interval for n < 10, BCa bootstrap from n = 10" in table.caption
    assert "no interval for n < 3" in table.caption
    three = _runs({"et": [0.45, 0.46, 0.44], "vit": [0.50, 0.52, 0.51]})
    (table3,) = tables.results_tables(three, [MSE])
    half = stats.t.interval(0.95, 2, scale=stats.sem([0.45, 0.46, 0.44]))[1]
    assert table3.display["test mse_masked"].iloc[0] == f"0.450 ± {half:.3f}"


def test_holm_against_hand_computation() -> None:
    p = [0.01, 0.04, 0.03, np.nan, 0.005]
    # m = 4 finite: sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max
    want = [0.03, 0.06, 0.06, np.nan, 0.02]
    np.testing.assert_allclose(holm(p), want, rtol=1e-12)
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert holm([]).size == 0


def test_comparison_table_holm_over_the_primary_metric_only() -> None:
    """The primary metric's rows (the image task's: masked MSE; 3 baselines) form the one Holm family; a raw
    p < 0.05 that Holm lifts above 0.05 reads "no difference shown"; the secondary metric (PSNR) is descriptive:
    raw p, no Holm p, no verdict however small its p. Naming PSNR primary swaps the roles."""
    base = np.array([0.50, 0.52, 0.49, 0.51, 0.50])
    diffs = {("mse", "vit"): np.array([-0.10, -0.11, -0.09, -0.10, -0.12]),
             ("psnr", "vit"): np.array([-1.0, -1.1, -0.9, -1.05, -0.95]),
             ("mse", "mlp"): np.array([0.012, 0.022, 0.004, 0.015, 0.002]),
             ("psnr", "mlp"): np.array([0.3, -0.2, 0.1, -0.4, 0.25]),
             ("mse", "vit-tied"): np.array([0.010, 0.020, 0.004, 0.016, 0.002]),
             ("psnr", "vit-tied"): np.array([0.5, 0.6, 0.4, 0.55, 0.45])}
    et_psnr = 20 + base
    values = {"et": {MSE: base, PSNR: et_psnr}}
    for b in ("vit", "mlp", "vit-tied"):
        values[b] = {MSE: base - diffs[("mse", b)], PSNR: et_psnr - diffs[("psnr", b)]}
    rows = [{"dataset": "digits", "protocol": "masked-completion", "model": m, "task": "image", "split": -1,
             "seed": s, "paper_comparable": False, "metrics." + MSE: v[MSE][s], "metrics." + PSNR: v[PSNR][s]}
            for m, v in values.items() for s in range(5)]
    runs = pd.DataFrame(rows)
    runs[["split", "seed"]] = runs[["split", "seed"]].astype("Int64")
    raw = {k: stats.ttest_1samp(d, 0).pvalue for k, d in diffs.items()}

    def by_hand(metric: str) -> dict[tuple[str, str], float]:  # Holm over one metric's 3 rows
        family = sorted((k for k in raw if k[0] == metric), key=raw.get)
        out, running = {}, 0.0
        for i, k in enumerate(family):
            running = max(running, min(1.0, (len(family) - i) * raw[k]))
            out[k] = running
        return out

    name = {"mse": MSE, "psnr": PSNR}
    for primary in ("mse", "psnr"):
        (table,) = tables.comparison_tables(runs, [MSE, PSNR], primary=None if primary == "mse" else PSNR)
        data = table.data.set_index(["metric", "baseline"])
        hand = by_hand(primary)
        for (m, b), d in diffs.items():
            row = data.loc[(name[m], b)]
            assert row["p_ttest"] == pytest.approx(raw[(m, b)])
            assert row["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
            if m == primary:
                assert row["p_holm"] == pytest.approx(hand[(m, b)])
            else:
                assert np.isnan(row["p_holm"]) and row["favours"] == SECONDARY
        assert "Holm-adjusted paired-t p over the 3 comparisons of the primary metric" in table.caption
        assert f"test {'mse_masked' if primary == 'mse' else 'psnr'} (one family" in table.caption
        assert "Secondary metrics are descriptive" in table.caption
    (table,) = tables.comparison_tables(runs, [MSE, PSNR])  # the default primary: the image task's masked MSE
    data = table.data.set_index(["metric", "baseline"])
    assert raw[("mse", "mlp")] < 0.05 <= by_hand("mse")[("mse", "mlp")]  # the constructed case: raw yes, Holm no
    assert data.loc[(MSE, "vit"), "favours"] == "et"  # lower MSE
    assert data.loc[(MSE, "mlp"), "favours"] == "no difference shown"
    assert raw[("psnr", "vit")] < 1e-4 and data.loc[(PSNR, "vit"), "favours"] == SECONDARY
    assert {"d_z (paired)", "p (Holm)", "p (paired t)"} <= set(table.display.columns)
    # compare() alone: one metric is its own family of 3
    alone = compare(runs, MSE).set_index("baseline")
    assert alone.loc["mlp", "p_holm"] == pytest.approx(by_hand("mse")[("mse", "mlp")])
    # one task's declared primary; an override without it falls back to the first metric asked for
    assert primary_metric(runs, [PSNR, MSE]) == MSE and primary_metric(runs, [PSNR]) == PSNR
    graph = pd.DataFrame({"task": ["graph"]})
    assert primary_metric(graph, ["best/test/auroc", "best/test/auprc"]) == "best/test/auprc"


def test_single_pair_is_no_test() -> None:
    runs = _runs({"et": [0.4], "vit": [0.5]})
    row = compare(runs, MSE).iloc[0]
    assert row["n"] == 1 and np.isnan(row["p_holm"]) and row["favours"] == "no test (n=1)"
    assert summarize(runs, MSE)["interval"].tolist() == ["none", "none"]
