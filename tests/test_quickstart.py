"""The README's main job, reduced: the quickstart grid through Ray Tune + MLflow, then the report on its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from etbench.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
QUICKSTART_GRAPH = QUICKSTART.with_name("quickstart_graph.yaml")


@pytest.mark.slow
def test_reduced_quickstart_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["base"]["task"].update({"limit_train": 96, "limit_eval": 48})
    spec["base"]["train"].update({"epochs": 1, "eval_trace_samples": 4})
    spec["axes"] = {"model.et.steps": [1, 2]}
    spec["seeds"] = [0]
    grid = tmp_path / "quickstart.yaml"
    grid.write_text(yaml.safe_dump(spec))
    gspec = yaml.safe_load(QUICKSTART_GRAPH.read_text())
    gspec["base"]["train"].update({"epochs": 2})
    gspec["seeds"] = [0]
    ggrid = tmp_path / "quickstart_graph.yaml"
    ggrid.write_text(yaml.safe_dump(gspec))
    results = tmp_path / "results"
    assert main(["quickstart", "--grid", str(grid), "--grid", str(ggrid), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "quickstart done" in out and "MLflow store" in out and "[quickstart_graph]" in out
    assert "workflowType=machine_learning&viewStateShareKey=etbench" in out  # the UI link that opens the runs table
    assert "Configuration for experiment" not in out and "TensorBoard" not in out  # Tune's box went to the log
    assert "Configuration for experiment" in (results / "quickstart" / "logs" / "library.log").read_text()
    graph_report = results / "quickstart_graph" / "report"
    assert "runs analysed: 5" in (graph_report / "README.md").read_text()  # ET × T ∈ {1, 2} + GCN, BWGNN, MLP
    graph_md = next(p for p in (graph_report / "tables").glob("results_synthetic*.md")).read_text()
    assert all(f"| {m} |" in graph_md for m in ("et", "gcn", "bwgnn", "mlp")), graph_md
    report = results / "quickstart" / "report"
    index = (report / "README.md").read_text()
    assert "runs analysed: 4" in index
    tables = {p.name for p in (report / "tables").iterdir()}
    assert any(n.startswith("results_digits") and n.endswith(".md") for n in tables)
    assert any(n.startswith("compare_digits") and n.endswith(".tex") for n in tables)
    md = next(p for p in (report / "tables").glob("results_digits*.md")).read_text()
    assert "not paper-comparable" in md and "| et | 1 |" in md and "| vit | 2 |" in md
    figs = list((report / "figures").glob("*.png"))
    assert any(p.name.startswith("steps_") for p in figs) and any(p.name.startswith("energy_") for p in figs)
    assert all(p.stat().st_size > 0 for p in figs)
    # the second call finds every config FINISHED and runs nothing
    assert main(["quickstart", "--grid", str(grid), "--grid", str(ggrid), "--results", str(results)]) == 0
    again = capsys.readouterr().out
    assert "4 already FINISHED" in again and "5 already FINISHED" in again
