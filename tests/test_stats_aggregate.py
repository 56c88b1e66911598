"""IQM, stratified bootstrap and probability of improvement across datasets, against hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from etbench.analysis import tables
from etbench.analysis.aggregate import (
    AggregateConfig,
    aggregate,
    aggregate_tables,
    iqm,
    normalised_scores,
    probability_of_improvement,
    stratified_iqm,
)

AUROC, MSE = "best/test/auroc", "best/test/mse_masked"


def test_iqm_by_hand() -> None:
    assert iqm(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])) == pytest.approx(0.45)  # mean of 0.3..0.6
    assert iqm(np.array([0.0, 1.0, 1.0, 1.0, 100.0, 2.0, 2.0, -50.0])) == pytest.approx(1.25)  # outliers cut


def test_stratified_bootstrap_keeps_tasks() -> None:
    """Each task constant → every stratified resample is the same → zero-width interval. A bootstrap that
    pooled the runs before resampling would draw unequal numbers from the two tasks and spread."""
    res = stratified_iqm([np.full(4, 0.2), np.full(4, 0.8)], AggregateConfig(n_resamples=500))
    assert res["iqm"] == pytest.approx(0.5) and res["ci_low"] == pytest.approx(0.5)
    assert res["ci_high"] == pytest.approx(0.5)
    assert res["n_tasks"] == 2 and res["n_runs"] == 8
    noisy = stratified_iqm([np.array([0.1, 0.3, 0.2, 0.5]), np.array([0.7, 0.9, 0.6, 0.8])])
    assert noisy["ci_low"] < noisy["iqm"] < noisy["ci_high"]


def test_probability_of_improvement_by_hand() -> None:
    et = [np.array([0.6, 0.7]), np.array([0.9, 0.95])]
    gcn = [np.array([0.5, 0.7]), np.array([0.8, 0.85])]
    # task A: 0.6>0.5 (1), 0.6<0.7 (0), 0.7>0.5 (1), 0.7=0.7 (½) → 2.5/4; task B: all four won → 1
    res = probability_of_improvement(et, gcn, higher=True)
    assert res["p_improve"] == pytest.approx((0.625 + 1.0) / 2)
    u = stats.mannwhitneyu(et[0], gcn[0]).statistic / 4  # the same per-task quantity
    assert u == pytest.approx(0.625)
    assert res["ci_low"] <= res["p_improve"] <= res["ci_high"] <= 1.0
    lower = probability_of_improvement(et, gcn, higher=False)  # direction flips the win
    assert lower["p_improve"] == pytest.approx((0.375 + 0.0) / 2)
    with pytest.raises(ValueError, match="number of tasks"):
        probability_of_improvement(et, gcn[:1], higher=True)


def _runs() -> pd.DataFrame:
    values = {("tolokers", "et"): [0.6, 0.7], ("tolokers", "gcn"): [0.5, 0.7], ("tolokers", "mlp"): [0.5, 0.5],
              ("questions", "et"): [0.9, 0.95], ("questions", "gcn"): [0.8, 0.85]}
    rows = [{"dataset": d, "protocol": "gadbench", "model": m, "task": "graph", "split": 0, "seed": s,
             "paper_comparable": True, "metrics." + AUROC: v}
            for (d, m), vs in values.items() for s, v in enumerate(vs)]
    frame = pd.DataFrame(rows)
    frame[["split", "seed"]] = frame[["split", "seed"]].astype("Int64")
    return frame


def test_aggregate_frame_and_table() -> None:
    runs = _runs()
    iqm_rows, poi, notes = aggregate(runs, AUROC)
    et = iqm_rows.set_index("method").loc["et"]
    assert et["iqm"] == pytest.approx(iqm(np.array([0.6, 0.7, 0.9, 0.95]))) and et["n_tasks"] == 2
    assert list(poi["baseline"]) == ["gcn"] and poi.iloc[0]["p_improve"] == pytest.approx(0.8125)
    assert any("mlp left out" in n for n in notes)  # mlp ran on one of the two datasets only
    (table,), _ = aggregate_tables(runs, [AUROC], task="graph")
    md = tables.to_markdown(table)
    assert "0.812 [" in md and "stratified bootstrap" in table.caption and "tolokers" in table.caption
    one, notes = aggregate_tables(runs[runs["dataset"] == "tolokers"], [AUROC], task="graph")
    assert one == [] and "needs ≥ 2" in notes[0]


def test_unbounded_metric_normalised_per_task() -> None:
    runs = pd.DataFrame({"dataset": ["a", "a", "a", "b", "b"], "protocol": "p", "model": "et",
                         "metrics." + MSE: [1.0, 2.0, 3.0, 10.0, 10.0]})
    np.testing.assert_allclose(normalised_scores(runs, MSE), [0.0, 0.5, 1.0, 0.5, 0.5])
    runs["metrics." + AUROC] = [0.2, 0.4, 0.6, 0.7, 0.9]
    np.testing.assert_allclose(normalised_scores(runs, AUROC), [0.2, 0.4, 0.6, 0.7, 0.9])  # bounded: as is


def test_report_hook_writes_aggregate_table_for_two_datasets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from etbench.analysis.references import load_references
    from etbench.analysis.report import ReportResult, _tables
    from etbench.analysis.stats import CIConfig

    runs = _runs()
    result = ReportResult(out=tmp_path, index=tmp_path / "README.md", runs_csv=tmp_path / "runs.csv", n_runs=len(runs),
                          metrics={})
    sections = _tables(runs, [AUROC], [], "et", CIConfig(), load_references(None), tmp_path, result, lambda s: None)
    assert (tmp_path / "aggregate_graph_auroc.md").exists() and (tmp_path / "aggregate_graph_auroc.csv").exists()
    assert any("IQM" in s and "P(et better)" in s for s in sections)
    assert any("mlp left out" in s for s in result.skipped)
    one = ReportResult(out=tmp_path, index=tmp_path / "README.md", runs_csv=tmp_path / "r.csv", n_runs=1, metrics={})
    sections = _tables(runs[runs["dataset"] == "questions"], [AUROC], [], "et", CIConfig(), load_references(None),
                       tmp_path / "one", one, lambda s: None)
    assert not any("IQM" in s for s in sections) and one.skipped == []
