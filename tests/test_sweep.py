"""Grids: validation, expansion and hashing; Ray Tune sweeps with MLflow dedup, NaN trials, kill + resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from etbench.cli import main
from etbench.sweep.grid import GridError, expand, load_grid
from etbench.sweep.runner import SweepError, run_sweep

TINY_BASE = {
    "task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2},
}


def write_grid(tmp: Path, name: str = "g", **over) -> Path:
    spec = {"name": name, "base": TINY_BASE, "models": ["et"], "axes": {"model.et.steps": [1, 2]}, "seeds": [0],
            "max_concurrent_trials": 2, **over}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --- grid files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: g\naxes: {model.et.steps: [1, 2]\n", "malformed YAML"),
        ("name: g\nbogus: 1\n", "bogus"),
        ("name: g\naxes: {model.et.stepz: [1, 2]}\n", "model.et.stepz"),
        ("name: g\nmodels: [et, resnet]\n", "resnet"),
        ("name: g\naxes: {model.et.steps: [0]}\n", "steps must be a positive integer"),
        ("name: g\nbase: {train: {lr: fast}}\n", "train.lr"),
        ("name: g\naxes: {model.et.steps: []}\n", "no values"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_grid_files_fail_clearly_and_create_nothing(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    results = tmp_path / "results"
    with pytest.raises(GridError):
        run_sweep(path, results_dir=results, progress=False)
    assert not results.exists()
    assert main(["sweep", "run", str(path), "--results", str(results)]) == 2
    assert not results.exists()


def test_expansion_hashes_and_et_only_axes(tmp_path: Path) -> None:
    path = write_grid(tmp_path, models=["et", "vit"], seeds=[0, 1],
                      axes={"model.et.steps": [1, 2], "model.et.terms": ["attn+hn", "attn"]})
    trials = expand(load_grid(path))
    et = [t for t in trials if t.model == "et"]
    vit = [t for t in trials if t.model == "vit"]
    assert len(et) == 2 * 2 * 2 and len(vit) == 2 * 2  # terms is an ET-only axis: not swept for the baseline
    assert all("model.et.terms" not in t.axes for t in vit)
    assert len({t.config_hash for t in trials}) == len(trials)
    again = expand(load_grid(path))
    assert [t.config_hash for t in again] == [t.config_hash for t in trials]
    assert {t.config.model.et.steps for t in trials} == {1, 2}


def test_graph_baselines_ignore_every_et_axis(tmp_path: Path) -> None:
    """On graphs a GNN baseline is sized by model.hidden / model.layers: model.et.steps must not multiply its trials."""
    spec = {"name": "g", "base": {"task": {"kind": "graph", "dataset": "synthetic"}, "train": {"epochs": 1}},
            "models": ["et", "gcn"], "axes": {"model.et.steps": [1, 2], "model.hidden": [16, 32]}, "seeds": [0]}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    trials = expand(load_grid(path))
    gcn = [t for t in trials if t.model == "gcn"]
    assert len([t for t in trials if t.model == "et"]) == 4 and len(gcn) == 2
    assert all("model.et.steps" not in t.axes for t in gcn) and {t.config.model.hidden for t in gcn} == {16, 32}


def test_random_axis_is_seeded(tmp_path: Path) -> None:
    axis = {"train.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2, "samples": 3}}
    a = expand(load_grid(write_grid(tmp_path, name="r1", axes=axis)))
    b = expand(load_grid(write_grid(tmp_path, name="r2", axes=axis)))
    lrs = [t.config.train.lr for t in a]
    assert lrs == [t.config.train.lr for t in b] and len(set(lrs)) == 3
    assert all(1e-4 <= v <= 1e-2 for v in lrs)


def test_shipped_grids_validate_and_plan(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert {"quickstart.yaml", "image_steps.yaml", "image_energy_terms.yaml", "image_memory.yaml",
            "image_vs_transformers.yaml"} <= {f.name for f in files}
    for f in files:
        assert "Trials:" in f.read_text() and "Cost:" in f.read_text(), f"{f.name} lacks its header comment"
        assert main(["sweep", "plan", str(f)]) == 0
    out = capsys.readouterr().out
    assert "quickstart: 12 trials" in out and "quickstart_graph: 15 trials" in out and "nothing was created" in out


# --- real sweeps (local loopback Ray) -------------------------------------------------------------------------
def _finished_by_hash(uri: str, experiment: str) -> dict[str, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list[str]] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("etbench.kind") != "grid":  # the grid's parent run holds no trial (issue 28.2)
            out.setdefault(r.data.tags["etbench.config_hash"], []).append(r.info.status)
    return out


@pytest.mark.slow
def test_sweep_tracks_dedups_and_records_nan_trials(tmp_path: Path) -> None:
    results = tmp_path / "results"
    path = write_grid(tmp_path, axes={"model.et.steps": [1, 2], "train.lr": [0.003, 1.0e30]})
    res = run_sweep(path, results_dir=results, progress=False)
    assert len(res.finished) == 2 and len(res.failed) == 2, res
    statuses = _finished_by_hash(res.tracking_uri, "g")
    assert sorted(s for v in statuses.values() for s in v) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res.tracking_uri)
    failed = client.search_runs([client.get_experiment_by_name("g").experiment_id],
                                "attributes.status = 'FAILED' and tags.`etbench.config_hash` != ''")
    assert len(failed) == 2 and all("non-finite training loss" in r.data.tags["etbench.error"] for r in failed)
    # a second run of the same grid plus one new axis value runs only the new trial (+ the failed ones again)
    path = write_grid(tmp_path, axes={"model.et.steps": [1, 2, 3], "train.lr": [0.003]})
    res2 = run_sweep(path, results_dir=results, progress=False)
    assert len(res2.skipped) == 2 and len(res2.finished) == 1
    assert all(v.count("FINISHED") <= 1 for v in _finished_by_hash(res.tracking_uri, "g").values())


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's GCS, raylet, trial workers), by PID."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [psutil.Process(proc.pid), *tree] if proc.poll() is None else tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.slow
def test_killed_sweep_resumes_only_missing_trials(tmp_path: Path) -> None:
    results = tmp_path / "results"
    path = write_grid(tmp_path, name="k", axes={"model.et.steps": [1, 2, 3]}, max_concurrent_trials=1,
                      base={**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 25}})
    script = textwrap.dedent(f"""
        from etbench.sweep.runner import run_sweep
        run_sweep({str(path)!r}, results_dir={str(results)!r}, progress=False)
    """)
    uri = f"sqlite:///{results.resolve() / 'mlflow.db'}"
    results.mkdir()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # create the store first: two processes must not both migrate it
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env={**os.environ})
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            time.sleep(0.3)
            if proc.poll() is not None:
                pytest.fail("sweep finished before it could be killed")
            try:
                done = _finished_by_hash(uri, "k")
            except Exception:
                continue
            trials = results / "k" / "trials"
            mid_run = [d for d in trials.glob("*") if (d / "checkpoints" / "latest").exists()
                       and not (d / "summary.json").exists()] if trials.exists() else []
            if sum(v.count("FINISHED") for v in done.values()) >= 1 and mid_run:
                break
        else:
            pytest.fail("no trial finished (with another mid-run) within 300 s")
    finally:
        _kill_tree(proc)
    before = _finished_by_hash(uri, "k")
    n_before = sum(v.count("FINISHED") for v in before.values())
    assert 1 <= n_before < 3
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(path, results_dir=results, progress=False)
    res = run_sweep(path, results_dir=results, progress=False, resume=True)
    assert len(res.skipped) == n_before and len(res.finished) == 3 - n_before
    after = _finished_by_hash(uri, "k")
    assert len(after) == 3 and all(v.count("FINISHED") == 1 for v in after.values()), after
    # one parent run for the grid, re-opened by --resume (issue 28.2): every trial run (also the interrupted one
    # --resume continued) is its child, and it is FINISHED now
    client = MlflowClient(uri)
    every = client.search_runs([client.get_experiment_by_name("k").experiment_id], max_results=100)
    (parent,) = [r for r in every if r.data.tags.get("etbench.kind") == "grid"]
    assert parent.info.status == "FINISHED" and parent.data.tags["etbench.attempts"] == "2"
    assert {r.data.tags.get("mlflow.parentRunId") for r in every if r is not parent} == {parent.info.run_id}


@pytest.mark.parametrize("distributed", [False, True])
def test_a_retried_trial_continues_its_own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               distributed: bool) -> None:
    """Tune's retry of a trial whose first attempt left a run folder resumes it (was RunExistsError for 2 workers)."""
    from etbench.engine import launch, tracked
    from etbench.engine.loop import checkpoint_dir
    from etbench.sweep import runner

    over = {"resources": {"workers": 2, "cpus_per_worker": 0.5}} if distributed else {}
    spec = load_grid(write_grid(tmp_path, **over))
    trial = expand(spec)[0]
    payload = runner._trial_payload(trial, spec, f"sqlite:///{tmp_path / 'm.db'}", "g", tmp_path / "r", False, "rid")
    out = Path(payload["out"])
    calls: list[tuple[bool, str | None]] = []

    def fake_fit(cfg, out_, tracking=None, resume=False, **kw):
        calls.append((resume, tracking.run_id))
        return {"best": {"val/loss": 1.0}}

    monkeypatch.setattr(launch, "fit", fake_fit)
    monkeypatch.setattr(tracked, "run_tracked", lambda cfg, out_, spec_, resume=False, **kw: fake_fit(
        cfg, out_, spec_, resume))
    assert runner.run_trial(payload)["status"] == "finished"
    # the first attempt left its folder behind (Ray Train run dir, or a local checkpoint), then the trial is retried
    (out / "ray" / launch.run_name(trial.config) if distributed else checkpoint_dir(out)).mkdir(parents=True)
    assert runner.run_trial(payload)["status"] == "finished"
    assert calls == [(False, None), (True, "rid")]
