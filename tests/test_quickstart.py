"""The README's main job, reduced: the quickstart grid through Ray Tune + MLflow, then the report on its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from etbench.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.mark.slow
def test_reduced_quickstart_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load(QUICKSTART.read_text())
    spec["base"]["task"].update({"limit_train": 96, "limit_eval": 48})
    spec["base"]["train"].update({"epochs": 1, "eval_trace_samples": 4})
    spec["axes"] = {"model.et.steps": [1, 2]}
    spec["seeds"] = [0]
    grid = tmp_path / "quickstart.yaml"
    grid.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    assert main(["quickstart", "--grid", str(grid), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "quickstart done" in out and "MLflow store" in out
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
    assert main(["quickstart", "--grid", str(grid), "--results", str(results)]) == 0
    assert "4 already FINISHED" in capsys.readouterr().out
