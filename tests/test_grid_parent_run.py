"""Issue 28 item 2: a grid is one MLflow parent run, every trial run its child (``mlflow.parentRunId``).

A tiny plain grid (2 one-epoch digits trials, one Ray session) run into one results folder, then re-run twice without
training anything: ``--resume`` after its ``grid_run.json`` was lost (the key tag finds the same parent), and a
re-run after a trial run lost its parent tag and the grid file was edited (the run is adopted; the earlier grid
file stays under ``history/``). The report leaves the parent out of its runs and attaches itself to it. That a
re-attached trial run (a retry, ``--resume``) is re-tagged is tested on ``start_tracking`` itself, without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from etbench.tracking import schema as S

BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}


def _grid(tmp: Path) -> Path:
    path = tmp / "gp.yaml"
    path.write_text(yaml.safe_dump({"name": "gp", "base": BASE, "models": ["et"], "axes": {"model.et.steps": [1, 2]},
                                    "seeds": [0], "max_concurrent_trials": 1}))
    return path


def _split(client: MlflowClient, experiment: str) -> tuple[list[Any], list[Any]]:
    """(parent runs, trial runs) of the experiment."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return ([r for r in runs if r.data.tags.get(S.TAG_KIND) == S.KIND_GRID],
            [r for r in runs if r.data.tags.get(S.TAG_KIND) != S.KIND_GRID])


def _artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(dst))).read_text()


def test_the_schema_names_mlflows_own_nested_run_tag() -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    assert S.TAG_PARENT_RUN == MLFLOW_PARENT_RUN_ID


def test_a_reattached_trial_run_becomes_the_grids_child(tmp_path: Path) -> None:
    """A trial run opened before the grid had a parent (here: FAILED) is re-attached, not replaced, and tagged; new
    runs carry the tag from their creation, also a Ray Train trial's (opened by ``launch.fit``'s driver side)."""
    from etbench.config import resolve_run_config
    from etbench.engine.tracked import TrackingSpec, start_tracking
    from etbench.tracking.grid_run import grid_key, open_grid_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}})
    spec = TrackingSpec(uri=uri, experiment="x", grid="x", run_name="t", artifact_root=str(tmp_path / "a"))
    first = start_tracking(spec, cfg, tmp_path / "trial")
    first.finish("FAILED", "node lost")
    client = MlflowClient(uri)
    assert S.TAG_PARENT_RUN not in client.get_run(first.run_id).data.tags
    parent = open_grid_run(uri, "x", grid="x", key=grid_key("x", "x", str(tmp_path)), storage=str(tmp_path))
    again = start_tracking(TrackingSpec(**{**spec.__dict__, "parent_run_id": parent}), cfg, tmp_path / "trial")
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).data.tags[S.TAG_PARENT_RUN] == parent
    fresh = start_tracking(TrackingSpec(**{**spec.__dict__, "parent_run_id": parent}), cfg, tmp_path / "other")
    assert fresh.run_id != first.run_id and client.get_run(fresh.run_id).data.tags[S.TAG_PARENT_RUN] == parent
    # a Ray Train (DeepSpeed) trial's run is opened by the trial's driver before its workers attach to it
    from etbench.engine.launch import _tracking

    dist = _tracking(TrackingSpec(**{**spec.__dict__, "parent_run_id": parent}), cfg, tmp_path / "dist")
    assert dist is not None and client.get_run(dist.run_id).data.tags[S.TAG_PARENT_RUN] == parent
    # the key finds the same parent again (no second one), and a store without the file is never created
    assert open_grid_run(uri, "x", grid="x", key=grid_key("x", "x", str(tmp_path)), storage=str(tmp_path)) == parent
    from etbench.tracking.grid_run import attach_report

    assert attach_report("x", f"sqlite:///{tmp_path / 'none.db'}", tmp_path) == []
    assert not (tmp_path / "none.db").exists()


def test_the_parent_ends_with_the_grids_outcome() -> None:
    from etbench.sweep.grid_parent import outcome
    from etbench.sweep.trial import SweepResult

    res = SweepResult("g", "g", "u", Path("."), planned=3, finished=["a"], skipped=["b"])
    assert outcome(res, {"a", "b"}) == ("FINISHED", None)
    status, why = outcome(res, {"a", "b", "c"})  # --only left one unrun
    assert status == "KILLED" and why is not None and "1 of 3 planned trial(s) not run" in why
    res.failed["c"] = "diverged"
    assert outcome(res, {"a", "b", "c"})[0] == "FAILED" and outcome(res, None)[0] == "FAILED"


@pytest.mark.slow
def test_one_parent_run_per_grid_across_resume_and_reruns(tmp_path: Path) -> None:
    from etbench.analysis.load import load_runs
    from etbench.cli import main
    from etbench.sweep.runner import run_sweep

    grid, results = _grid(tmp_path), tmp_path / "results"
    res = run_sweep(grid, results_dir=results, progress=False)
    assert len(res.finished) == 2 and not res.failed, res
    client = MlflowClient(res.tracking_uri)
    (parent,), trials = _split(client, "gp")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED" and S.TAG_ATTEMPTS not in parent.data.tags
    assert len(trials) == 2 and [t.data.tags[S.TAG_PARENT_RUN] for t in trials] == [pid, pid]
    assert parent.data.tags[S.TAG_GRID] == "gp" and S.TAG_CONFIG_HASH not in parent.data.tags
    assert not parent.data.params and not parent.data.metrics
    assert _artifact(client, pid, "grid/gp.yaml", tmp_path / "dl") == grid.read_text()
    plan = json.loads(_artifact(client, pid, "plan.json", tmp_path / "dl"))
    hashes = {t.data.tags[S.TAG_CONFIG_HASH] for t in trials}
    assert {t["config_hash"] for t in plan["trials"]} == hashes and len(hashes) == 2
    cost = json.loads(_artifact(client, pid, "cost.json", tmp_path / "dl"))
    assert cost["trials"] == 2 and cost["train_pflop"] == pytest.approx(sum(t["train_pflop"] for t in plan["trials"]))
    assert cost["train_pflop"] > 0
    record = results / "gp" / S.GRID_RUN_FILE
    assert json.loads(record.read_text())["run_id"] == pid
    ids = {t.info.run_id for t in trials}

    record.unlink()  # lost: --resume finds the parent by its key tag, never makes a second one
    res = run_sweep(grid, results_dir=results, progress=False, resume=True)
    assert len(res.skipped) == 2 and not res.finished and not res.failed, res
    (parent,), trials = _split(client, "gp")
    assert parent.info.run_id == pid and parent.info.status == "FINISHED" and parent.data.tags[S.TAG_ATTEMPTS] == "2"
    assert {t.info.run_id for t in trials} == ids and {t.data.tags[S.TAG_PARENT_RUN] for t in trials} == {pid}
    assert json.loads(record.read_text())["run_id"] == pid

    # a trial run without a parent (logged before grids had one) is adopted by the next sweep; the grid file was
    # edited: the earlier version stays in the parent's history/
    client.delete_tag(trials[0].info.run_id, S.TAG_PARENT_RUN)
    old_text = grid.read_text()
    grid.write_text(old_text + "description: edited\n")
    res = run_sweep(grid, results_dir=results, progress=False)
    assert len(res.skipped) == 2 and not res.finished and not res.failed, res
    (parent,), trials = _split(client, "gp")
    assert parent.info.run_id == pid and parent.info.status == "FINISHED" and parent.data.tags[S.TAG_ATTEMPTS] == "3"
    assert {t.info.run_id for t in trials} == ids and {t.data.tags[S.TAG_PARENT_RUN] for t in trials} == {pid}
    import hashlib

    old_hash = hashlib.sha256(old_text.encode()).hexdigest()
    assert _artifact(client, pid, f"history/{old_hash[:12]}/grid/gp.yaml", tmp_path / "h") == old_text
    assert _artifact(client, pid, "grid/gp.yaml", tmp_path / "new") == grid.read_text()
    assert parent.data.tags[S.TAG_GRID_CONTENT_HASH] == hashlib.sha256(grid.read_bytes()).hexdigest()

    # the report's runs are the trials (the parent is neither analysed nor listed as left out) …
    table = load_runs("gp", res.tracking_uri)
    assert set(table.runs["run_id"]) == ids and pid not in set(table.excluded["run_id"])
    # … and the report lands in the parent run's artifacts, its cache left out
    out = tmp_path / "report"
    assert main(["report", "--experiment", "gp", "--results", str(results), "--out", str(out)]) == 0
    names = {a.path for a in client.list_artifacts(pid, S.REPORT_ARTIFACT_DIR)}
    assert f"{S.REPORT_ARTIFACT_DIR}/README.md" in names and f"{S.REPORT_ARTIFACT_DIR}/runs.csv" in names
    assert not [n for n in names if "/." in n]
    readme = _artifact(client, pid, f"{S.REPORT_ARTIFACT_DIR}/README.md", tmp_path / "r")
    assert readme == (out / "README.md").read_text()
