"""``etbench dynamics --grid`` (issue 24.3): every FINISHED run of a grid probed into one combined table, resumable,
logged to each MLflow run, and its report (figures and tables).

Oracles: the grid's own plan (hashes, models, training T, seeds), each run's recorded test metric at T' = its
training T, MLflow's artifact listing, the files on disk. A tiny digits grid (ET and vit-tied at T ∈ {1, 2}, one
seed, 1 epoch on 48 images) trained in-process once per module; one trial is left untrained until a resume test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from etbench.analysis.dynamics_grid import GridReportError, grid_report
from etbench.cli import main
from etbench.engine import dynamics as dyn
from etbench.engine.dynamics_prefix import probe_prefix
from etbench.engine.tracked import TrackingSpec, run_tracked
from etbench.sweep.dynamics_grid import CURVES_CSV, GRID_CSV, probe_grid
from etbench.sweep.grid import expand, load_grid

GRID = """
name: tiny_dyn
base:
  task: {kind: image, dataset: digits, limit_train: 48, limit_eval: 24}
  train: {epochs: 1, batch_size: 24, warmup_epochs: 0, eval_trace_samples: 2, device: cpu}
models: [et, vit-tied]
axes:
  model.et.steps: [1, 2]
seeds: [0]
"""
STEPS = ["0", "1", "3"]


def _train(trial: Any, results: Path, uri: str) -> None:
    run_tracked(trial.config, results / "tiny_dyn" / "trials" / trial.config_hash, progress=False,
                spec=TrackingSpec(uri=uri, experiment="tiny_dyn", grid="tiny_dyn", run_name=trial.run_name))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The grid file, its results folder and MLflow store; all trials but the last (vit-tied, T = 2) trained."""
    root = tmp_path_factory.mktemp("dyngrid")
    path = root / "tiny_dyn.yaml"
    path.write_text(GRID)
    results = (root / "results").resolve()
    results.mkdir()
    uri = f"sqlite:///{results / 'mlflow.db'}"
    trials = expand(load_grid(path))
    assert [(t.model, t.config.model.et.steps) for t in trials] == [("et", 1), ("et", 2), ("vit-tied", 1),
                                                                     ("vit-tied", 2)]
    for t in trials[:-1]:
        _train(t, results, uri)
    return {"path": path, "results": results, "uri": uri, "trials": trials, "root": root}


def _probe(grid: dict[str, Any], out: Path) -> Any:
    return probe_grid([grid["path"]], grid["results"], out, [int(s) for s in STEPS], [1.0, 2.0], say=lambda _: None)


def test_rows_for_every_finished_run_and_step_resumable(grid: dict[str, Any], tmp_path: Path) -> None:
    trials, out = grid["trials"], tmp_path / "probe"
    first = _probe(grid, out)
    done = [t.config_hash for t in trials[:-1]]
    assert first.probed == done and first.skipped == [] and first.not_finished == [trials[-1].config_hash]
    table = pd.read_csv(out / GRID_CSV, dtype={"config_hash": str})
    assert list(table.columns[:10]) == ["grid", "config_hash", "model", "train_steps", "train_alpha", "seed",
                                        "test_images", "recorded_test/mse_masked", "eval_steps", "alpha_scale"]
    for t in trials[:-1]:
        mine = table[table["config_hash"] == t.config_hash]
        scales = [1.0] if t.model == "vit-tied" else [1.0, 2.0]  # vit-tied has no α
        assert sorted(zip(mine["eval_steps"], mine["alpha_scale"], strict=True)) == sorted(
            (int(s), a) for s in STEPS for a in scales)
        assert set(mine["model"]) == {t.model} and set(mine["train_steps"]) == {t.config.model.et.steps}
        assert set(mine["seed"]) == {0}
        # T' = training T at α'/α = 1 is the run's own test metric (the last epoch's, from metrics.json)
        folder = grid["results"] / "tiny_dyn" / "trials" / t.config_hash
        recorded = json.loads((folder / "metrics.json").read_text())[-1]["test/mse_masked"]
        same = mine[(mine["eval_steps"] == t.config.model.et.steps) & (mine["alpha_scale"] == 1.0)]
        if len(same):  # T = 1 is among STEPS; T = 2 is not
            assert same["test/mse_masked"].item() == pytest.approx(recorded, rel=1e-6)
        assert list(mine["recorded_test/mse_masked"]) == pytest.approx([recorded] * len(mine), rel=1e-12)
    curves = pd.read_csv(out / CURVES_CSV, dtype={"config_hash": str})
    et1 = curves[(curves["config_hash"] == trials[0].config_hash) & (curves["alpha_scale"] == 1.0)]
    assert list(et1["step"]) == [0, 1, 2, 3] and set(et1["eval_steps"]) == {3}
    assert et1["energy"].notna().all() and et1["rel_update"].iloc[1:].notna().all()
    tied = curves[curves["config_hash"] == trials[2].config_hash]
    assert tied["energy"].isna().all() and tied["rel_update"].iloc[1:].notna().all()

    before = (out / GRID_CSV).read_bytes()
    again = _probe(grid, out)  # resumable: nothing new to probe, the table untouched
    assert again.probed == [] and again.skipped == done and (out / GRID_CSV).read_bytes() == before

    more = probe_grid([grid["path"]], grid["results"], out, [2], [1.0], say=lambda _: None)  # another T': added
    assert more.probed == done
    merged = pd.read_csv(out / GRID_CSV, dtype={"config_hash": str})
    assert len(merged) == len(table) + 3 and set(merged["eval_steps"]) == {0, 1, 2, 3}
    _train(trials[-1], grid["results"], grid["uri"])  # the last trial finishes: only it is probed next
    try:
        third = _probe(grid, out)
        assert third.probed == [trials[-1].config_hash] and third.not_finished == []
        assert set(pd.read_csv(out / GRID_CSV, dtype={"config_hash": str})["config_hash"]) == {
            t.config_hash for t in trials}
    finally:  # later tests see the module's grid as the fixture left it
        import shutil

        shutil.rmtree(grid["results"] / "tiny_dyn" / "trials" / trials[-1].config_hash)


@pytest.mark.parametrize("which", [0, 2])  # the ET (T = 1), vit-tied (T = 1)
def test_one_descent_per_scale_gives_the_probe_rows_exactly(grid: dict[str, Any], which: int) -> None:
    run = dyn.load_run(grid["results"] / "tiny_dyn" / "trials" / grid["trials"][which].config_hash)
    steps, scales = [3, 0, 1, 2], [1.0] if which == 2 else [0.5, 1.0]
    slow_c: list[dict[str, Any]] = []
    fast_c: list[dict[str, Any]] = []
    slow = dyn.probe(run, steps, scales, curves=slow_c, curve_steps=3)
    fast = probe_prefix(run, steps, scales, curves=fast_c, curve_steps=3)
    pd.testing.assert_frame_equal(pd.DataFrame(fast), pd.DataFrame(slow), check_exact=True)
    pd.testing.assert_frame_equal(pd.DataFrame(fast_c), pd.DataFrame(slow_c), check_exact=True)
    with pytest.raises(dyn.DynamicsError, match="must be ≥ 0"):
        probe_prefix(run, [-1], [1.0])


def test_test_limit_probes_the_first_images_under_their_masks(grid: dict[str, Any], tmp_path: Path) -> None:
    h = grid["trials"][0].config_hash
    full = _probe(grid, tmp_path / "full")
    table = pd.read_csv(full.csv, dtype={"config_hash": str})
    assert set(table["test_images"]) == {24}  # limit_eval 24
    part = probe_grid([grid["path"]], grid["results"], tmp_path / "part", [0, 1], [1.0], test_limit=5,
                      say=lambda _: None)
    sub = pd.read_csv(part.csv, dtype={"config_hash": str})
    assert set(sub["test_images"]) == {5} and len(sub) == 2 * 3
    # oracle: the same 5 images, their masks, evaluated directly
    run = dyn.load_run(grid["results"] / "tiny_dyn" / "trials" / h)
    run.task.splits = type(run.task.splits)(**{**vars(run.task.splits), "test": torch.utils.data.Subset(
        run.task.splits.test, range(5))})
    (row,) = dyn.probe(run, [1], [1.0])
    got = sub[(sub["config_hash"] == h) & (sub["eval_steps"] == 1)]["test/mse_masked"].item()
    assert got == pytest.approx(row["test/mse_masked"], rel=1e-9)


def test_each_run_gets_its_csv_in_mlflow(grid: dict[str, Any], tmp_path: Path) -> None:
    _probe(grid, tmp_path / "probe")
    client = MlflowClient(grid["uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny_dyn").experiment_id])
    probed = {t.config_hash for t in grid["trials"][:-1]}
    for r in runs:
        if r.data.tags.get("etbench.config_hash") in probed and r.info.status == "FINISHED":
            names = {Path(f.path).name for f in client.list_artifacts(r.info.run_id, "dynamics")}
            assert {"dynamics.csv", "dynamics_curve.csv"} <= names


def test_report_writes_figures_and_tables(grid: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "probe", tmp_path / "report"
    assert main(["dynamics", "--grid", str(grid["path"]), "--results", str(grid["results"]), "--steps", *STEPS,
                 "--out", str(out), "--report", str(report)]) == 0
    assert "probed 3" in capsys.readouterr().out
    for name in ("dynamics_grid_metric.png", "dynamics_grid_metric.pdf", "dynamics_grid_curves.png",
                 "dynamics_grid_curves.pdf", "dynamics_grid_table.md", "dynamics_grid_table.csv",
                 "dynamics_grid_runs.csv"):
        assert (report / name).stat().st_size > 0, name
    md = (report / "dynamics_grid_table.md").read_text()
    for t in grid["trials"][:-1]:
        assert t.config_hash in md
    runs = pd.read_csv(report / "dynamics_grid_runs.csv", dtype={"config_hash": str})
    assert len(runs) == 3 and set(runs["arm"]) == {"ET α=0.1", "vit-tied"}
    # the run table's value at T' = 0 is the combined table's
    table = pd.read_csv(out / GRID_CSV, dtype={"config_hash": str})
    h = grid["trials"][0].config_hash
    want = table[(table["config_hash"] == h) & (table["eval_steps"] == 0) & (table["alpha_scale"] == 1.0)]
    assert runs.set_index("config_hash").loc[h, "at_0"] == pytest.approx(want["test/mse_masked"].item())


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_grid_and_arguments_are_one_error_line(grid: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, results = str(tmp_path / "o"), str(grid["results"])
    assert "not found" in _error(capsys, ["dynamics", "--grid", str(tmp_path / "nope.yaml"), "--results", results,
                                          "--out", out])
    bad = tmp_path / "bad.yaml"
    bad.write_text(GRID.replace("seeds: [0]", "seeds: [0]\nepochs: 3"))
    assert "epochs" in _error(capsys, ["dynamics", "--grid", str(bad), "--results", results, "--out", out])
    vit = tmp_path / "vit.yaml"
    vit.write_text(GRID.replace("models: [et, vit-tied]", "models: [vit]"))
    assert "'vit'" in _error(capsys, ["dynamics", "--grid", str(vit), "--results", results, "--out", out])
    assert "no such folder" in _error(capsys, ["dynamics", "--grid", str(grid["path"]), "--results",
                                               str(tmp_path / "none"), "--out", out])
    assert "not both" in _error(capsys, ["dynamics", "some_run", "--grid", str(grid["path"]), "--out", out])
    assert "--grid" in _error(capsys, ["dynamics", "some_run", "--report", str(tmp_path / "r"), "--out", out])
    assert "--test-limit" in _error(capsys, ["dynamics", "--grid", str(grid["path"]), "--results", results,
                                             "--test-limit", "0", "--out", out])
    assert "-1" in _error(capsys, ["dynamics", "--grid", str(grid["path"]), "--results", results, "--steps", "-1",
                                   "--out", out])


def test_report_of_a_missing_or_empty_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GridReportError, match="no such probe table"):
        grid_report(tmp_path / "none.csv", tmp_path / "none_curves.csv", tmp_path / "r")
    empty = tmp_path / GRID_CSV
    pd.DataFrame(columns=["grid", "config_hash", "model", "train_steps", "train_alpha", "seed", "eval_steps",
                          "alpha_scale"]).to_csv(empty, index=False)
    with pytest.raises(GridReportError, match="no probed run"):
        grid_report(empty, tmp_path / CURVES_CSV, tmp_path / "r")
    assert issubclass(dyn.DynamicsError, ValueError)
