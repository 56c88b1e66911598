"""Issue 23 item 2: a trial's MLflow run survives retries, restarts and --resume (tracking.json in the trial folder).

Oracle, from a real SQLite MLflow store: one run per config hash, re-attached from FAILED with its stale error
cleared, each epoch in its history exactly once and equal to the trial's metrics.json, cost/wall_s over every
attempt, an attempt-count tag; planning closes every second live run of a hash; a run stopped early is never
taken for a finished trial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from etbench.engine.tracked import TrackingSpec
from etbench.sweep import runner
from etbench.sweep.grid import expand, load_grid
from etbench.tracking import schema as S

BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}


class NodeLost(RuntimeError):
    """Stands in for a trial process that died mid-run."""


def _grid(tmp: Path, name: str = "ident", **over: Any) -> Path:
    spec = {"name": name, "base": BASE, "models": ["et"], "axes": {"model.et.steps": [1]}, "seeds": [0], **over}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _payload(tmp: Path, uri: str, run_id: str | None = None) -> tuple[Any, dict[str, Any]]:
    spec = load_grid(_grid(tmp))
    trial = expand(spec)[0]
    return trial, runner._trial_payload(trial, spec, uri, "ident", tmp / "results", False, run_id)


def _runs(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else list(client.search_runs([exp.experiment_id], max_results=100))


def assert_history_is_metrics_json(uri: str, run_id: str, out: Path) -> None:
    """Every epoch of metrics.json is in the run's history exactly once, with the same value (and nothing more)."""
    client = MlflowClient(uri)
    rows = json.loads((out / "metrics.json").read_text())
    for key in ("train/loss", "val/mse_masked", "time/epoch_s"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, len(rows) + 1)), (key, [m.step for m in hist])
        by_step = {m.step: m.value for m in hist}
        assert all(math.isclose(by_step[i + 1], r[key], rel_tol=1e-12) for i, r in enumerate(rows)), key


def _crash_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """The trial dies right after writing epoch ``epoch``'s metrics.json, before that epoch's checkpoint."""
    from etbench.engine import run

    real, calls = run.write_metrics, {"n": 0}

    def dying(history: list[dict[str, float]], out: Path) -> None:
        real(history, out)
        calls["n"] += 1
        if calls["n"] == epoch:
            raise NodeLost(f"lost the node in epoch {epoch}")

    monkeypatch.setattr(run, "write_metrics", dying)


def test_a_retried_one_worker_trial_reattaches_its_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh sweep's payload names no run; the first attempt dies in epoch 2 (FAILED, epoch 1 checkpointed),
    Tune's retry re-enters the trainable: it continues the same run and the history has each epoch once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, payload = _payload(tmp_path, uri)
    out = Path(payload["out"])
    with monkeypatch.context() as m:
        _crash_at_epoch(m, 2)
        with pytest.raises(NodeLost):
            runner.run_trial(payload)
    (first,) = _runs(uri, "ident")
    assert first.info.status == "FAILED" and "NodeLost" in first.data.tags[S.TAG_ERROR]
    ident = json.loads((out / "tracking.json").read_text())
    assert ident["run_id"] == first.info.run_id  # written before the first epoch, kept on the trial's storage
    attempt1 = json.loads((out / "metrics.json").read_text())
    assert len(attempt1) == 2
    assert runner.run_trial(payload)["status"] == "finished"  # the retry
    (run,) = _runs(uri, "ident")  # no second run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert S.TAG_ERROR not in run.data.tags  # the stale error of attempt 1 is gone
    assert run.data.tags[S.TAG_ATTEMPTS] == "2"
    assert_history_is_metrics_json(uri, run.info.run_id, out)
    final = json.loads((out / "metrics.json").read_text())
    # wall time over both attempts: attempt 1's two epochs plus attempt 2's epochs 2-3 (epoch 2 trained twice)
    floor = sum(r["time/epoch_s"] for r in attempt1) + sum(r["time/epoch_s"] for r in final[1:])
    assert run.data.metrics["cost/wall_s"] >= floor
    assert json.loads((out / "summary.json").read_text())["cost"]["wall_s"] == run.data.metrics["cost/wall_s"]


def test_etbench_train_resume_reattaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etbench.cli import main

    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    args = ["train", "image", "--dataset", "digits", "--limit-train", "64", "--limit-eval", "32", "--epochs", "3",
            "--batch-size", "32", "--steps", "1", "--set", "train.eval_trace_samples=2", "--out", str(out),
            "--tracking-uri", uri, "--experiment", "cli"]
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        _crash_at_epoch(m, 2)
        with pytest.raises(NodeLost):
            main(args)
    assert main([*args, "--resume"]) == 0
    (run,) = _runs(uri, "cli")
    assert run.info.status == "FINISHED" and run.data.tags[S.TAG_ATTEMPTS] == "2" and S.TAG_ERROR not in run.data.tags
    assert_history_is_metrics_json(uri, run.info.run_id, out)
    assert main([*args, "--resume"]) == 2  # a finished run is never re-opened (one error line, not a second run)
    assert [r.info.status for r in _runs(uri, "cli")] == ["FINISHED"]


def _open(uri: str, experiment: str, cfg: Any, status: str | None = None, tags: dict[str, str] | None = None) -> str:
    from etbench.tracking.mlflow_log import RunTracker

    tracker = RunTracker(uri, experiment, "r")
    run_id = tracker.start(cfg, grid=experiment, extra_tags=tags)
    if status:
        MlflowClient(uri).set_terminated(run_id, status)
    return run_id


def _write_tracking(folder: Path, run_id: str, uri: str, experiment: str) -> None:
    """tracking.json as the first DeepSpeed trials wrote it (three keys): newer files add attempts and wall time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tracking.json").write_text(json.dumps({"run_id": run_id, "uri": uri, "experiment": experiment}))


def test_planning_keeps_the_folders_run_and_closes_every_other_live_run(tmp_path: Path) -> None:
    """Two live runs of one hash (an older driver's and a retry's): --resume continues the one the trial folder
    names (not the oldest) and closes the other KILLED with a reason; a FINISHED hash's orphan is closed too."""
    from etbench.storage import resolve_storage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_grid(_grid(tmp_path, axes={"model.et.steps": [1, 2]}))
    a, b = expand(spec)
    old = _open(uri, "ident", a.config)
    named = _open(uri, "ident", a.config)
    done = _open(uri, "ident", b.config, "FINISHED")
    orphan = _open(uri, "ident", b.config)
    st = resolve_storage(tmp_path / "results")
    folder = runner.trial_dir(runner.local_root(st), "ident", a.config_hash)
    (folder / "checkpoints" / "latest").mkdir(parents=True)
    _write_tracking(folder, named, uri, "ident")
    res = runner._plan_trials(spec, [a, b], st, uri, True, False, None, False)
    assert res.todo == [(a, named)] and res.skipped == [b.config_hash]
    client = MlflowClient(uri)
    status = {r: client.get_run(r).info.status for r in (old, named, done, orphan)}
    assert status == {old: "KILLED", named: "RUNNING", done: "FINISHED", orphan: "KILLED"}
    assert named in client.get_run(old).data.tags[S.TAG_CLOSED_REASON]
    assert S.TAG_CLOSED_REASON in client.get_run(orphan).data.tags


def test_a_run_stopped_early_is_never_taken_for_a_finished_trial(tmp_path: Path) -> None:
    """An ASHA-stopped run (FINISHED, tagged stopped_early) of the same config hash: the trial runs in full in a
    new run; the stopped run's folder is moved aside, not continued or deleted."""
    from etbench.sweep import tune_stage
    from etbench.tracking.mlflow_log import find_finished

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trial, payload = _payload(tmp_path, uri)
    stopped = _open(uri, "ident", trial.config, "FINISHED", {S.TAG_STOPPED_EARLY: "asha at epoch 1"})
    out = Path(payload["out"])
    _write_tracking(out, stopped, uri, "ident")
    assert find_finished(uri, "ident", trial.config_hash) == []
    ctx = {"uri": uri, "experiment": "ident", "trials": str(out.parent)}
    assert tune_stage._complete_runs(ctx, trial.config_hash) == []  # search_trial would have reported it
    assert runner.run_trial(payload)["status"] == "finished"
    runs = {r.info.run_id: r for r in _runs(uri, "ident")}
    assert len(runs) == 2 and runs[stopped].data.tags[S.TAG_STOPPED_EARLY]
    (new,) = [r for r in runs.values() if r.info.run_id != stopped]
    assert new.info.status == "FINISHED" and S.TAG_STOPPED_EARLY not in new.data.tags
    assert_history_is_metrics_json(uri, new.info.run_id, out)
    aside = [p for p in out.parent.iterdir() if p.name.startswith(f"{trial.config_hash}.stopped-")]
    assert len(aside) == 1 and json.loads((aside[0] / "tracking.json").read_text())["run_id"] == stopped
    assert [r.run_id for r in tune_stage._complete_runs(ctx, trial.config_hash)] == [new.info.run_id]


def test_distributed_trials_reopen_their_run_from_failed(tmp_path: Path) -> None:
    """The Ray Train path (``fit``) keeps the same identity: a FAILED run named by tracking.json is re-opened
    RUNNING with its error cleared and the attempt counted, before any worker starts."""
    from etbench.config import resolve_run_config
    from etbench.engine import launch

    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "trial"
    cfg = resolve_run_config({**BASE, "dist": {"workers": 2, "cpus_per_worker": 0.5}})
    spec = TrackingSpec(uri=uri, experiment="ds", grid="ds", run_name="ds")
    out.mkdir()  # fit writes config.json there first
    first = launch._tracking(spec, cfg, out)
    assert first is not None and json.loads((out / "tracking.json").read_text())["run_id"] == first.run_id
    tracker = first.tracker()
    tracker.attach(first.run_id)
    tracker.finish("FAILED", "WorkerGroupError: lost a node")
    again = launch._tracking(spec, cfg, out)
    assert again is not None and again.run_id == first.run_id
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "RUNNING" and S.TAG_ERROR not in run.data.tags and run.data.tags[S.TAG_ATTEMPTS] == "2"
    assert len(_runs(uri, "ds")) == 1


def test_ray_train_epochs_reach_mlflow_only_once_checkpointed(tmp_path: Path) -> None:
    """Rank 0 logs an epoch before the ranks checkpoint it; with checkpoints every 2 epochs, a worker group that
    dies in epoch 4 and restarts from the epoch-2 checkpoint re-trains epochs 3-4: the run must not hold attempt
    1's epoch 3, and ends with exactly metrics.json (as the trial's end_tracking reconciles it)."""
    from etbench.config import resolve_run_config
    from etbench.engine import launch
    from etbench.engine.tracked import end_tracking

    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "trial"
    cfg = resolve_run_config({**BASE, "train": {**BASE["train"], "checkpoint_every": 2, "epochs": 4},
                              "dist": {"workers": 2, "cpus_per_worker": 0.5}})
    out.mkdir()
    spec = launch._tracking(TrackingSpec(uri=uri, experiment="ds", grid="ds", run_name="ds"), cfg, out)
    assert spec is not None and spec.commit_every == 2

    def row(epoch: int, attempt: int) -> dict[str, float]:
        return {"epoch": float(epoch + 1), "train/loss": 1.0 / (epoch + 1) + attempt, "time/epoch_s": 0.1}

    first = spec.tracker()  # attempt 1's rank 0 (etbench.engine.worker: spec.tracker() + attach)
    first.attach(spec.run_id)
    for e in range(3):  # epochs 1-3 done, checkpoint after epoch 2; the group dies in epoch 4
        first.log_epoch(e, row(e, 0))
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(spec.run_id, "train/loss")) == [1, 2]
    second = spec.tracker()  # the restarted group resumes from the epoch-2 checkpoint
    second.attach(spec.run_id)
    history = [row(0, 0), row(1, 0)]
    for e in range(2, 4):
        history.append(row(e, 1))
        second.log_epoch(e, history[-1])
    (out / "metrics.json").write_text(json.dumps(history))
    end_tracking(second, {"best": {}, "cost": {"wall_s": 1.0}}, out)
    hist = client.get_metric_history(spec.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(i + 1, r["train/loss"]) for i, r in enumerate(history)]
