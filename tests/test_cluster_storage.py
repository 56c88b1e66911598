"""The storage setting, the multi-node refusals, the node pre-flight, per-trial resources, admission, provenance.

Everything here runs without a cluster (the pre-flight once on a local one-node Ray); the multi-node proofs with
nodes that share no disk are in ``tests/test_multinode.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from etbench import storage as stg
from etbench.admission import NodeType, check_fits
from etbench.config import ConfigError, resolve_run_config
from etbench.storage import StorageError

REPO = Path(__file__).resolve().parents[1]


# --- the one setting ----------------------------------------------------------------------------------------------
def test_storage_precedence_cli_grid_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(stg.ENV_STORAGE, raising=False)
    d = stg.resolve_storage()
    assert (d.root, d.source, d.given) == (str(tmp_path / "results"), "default", "results")
    monkeypatch.setenv(stg.ENV_STORAGE, "/mnt/env")
    assert stg.resolve_storage().root == "/mnt/env" and stg.resolve_storage().source == "$ETBENCH_STORAGE"
    assert stg.resolve_storage(grid="gs://b/grid/").root == "gs://b/grid"  # URIs are kept, only the slash goes
    c = stg.resolve_storage("rel/dir", grid="/mnt/grid", cli_flag="--results")
    assert (c.root, c.given, c.source) == (str(tmp_path / "rel" / "dir"), "rel/dir", "--results")


def test_a_uri_is_never_resolved_as_a_path() -> None:
    s = stg.resolve_storage("s3://bucket/etbench")
    assert s.is_uri and s.root == "s3://bucket/etbench"
    assert s.ray_path() == "s3://bucket/etbench/ray" and s.join("g", "trials", "h") == "s3://bucket/etbench/g/trials/h"
    with pytest.raises(StorageError, match="is a URI"):
        _ = s.local
    assert not stg.is_uri("/mnt/x") and not stg.is_uri("results") and stg.is_uri("file:///tmp/x")


def test_files_go_through_pyarrow_for_paths_and_uris(tmp_path: Path) -> None:
    for target in (str(tmp_path / "a" / "m.txt"), (tmp_path / "b" / "m.txt").as_uri()):
        assert not stg.exists(target)
        stg.write_text(target, "tok\n")
        assert stg.exists(target) and stg.read_text(target) == "tok\n"
        stg.remove(target)
        assert not stg.exists(target)


# --- refusals on a multi-node cluster -------------------------------------------------------------------------------
def test_single_machine_keeps_zero_setup_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    stg.check_cluster_storage(stg.resolve_storage("results"), None, nodes=1)  # relative + sqlite default: fine


@pytest.mark.parametrize(("given", "uri", "needles"), [
    ("results", "http://127.0.0.1:5000", ["--storage is the relative path 'results'", "NFS/EFS/Lustre"]),
    ("/mnt/shared/x", "sqlite:////mnt/shared/x/mlflow.db", ["is a file store", "--tracking-uri http://HEAD:5000"]),
    ("/mnt/shared/x", "file:///mnt/mlruns", ["is a file store"]),
    ("/mnt/shared/x", "/mnt/mlruns", ["is a file store"]),
    ("/mnt/shared/x", None, ["(default: sqlite under the storage) is a file store"]),
])
def test_multi_node_refuses_node_local_settings(given: str, uri: str | None, needles: list[str]) -> None:
    with pytest.raises(StorageError) as err:
        stg.check_cluster_storage(stg.resolve_storage(given), uri, nodes=2)
    assert "2 alive nodes" in str(err.value)
    for n in needles:
        assert n in str(err.value), str(err.value)


@pytest.mark.parametrize("uri", ["http://10.0.0.1:5000", "https://mlflow.example", "postgresql://u@db/mlflow",
                                 "databricks"])
def test_multi_node_accepts_shared_settings(uri: str) -> None:
    stg.check_cluster_storage(stg.resolve_storage("/mnt/shared/x"), uri, nodes=3)
    stg.check_cluster_storage(stg.resolve_storage("s3://b/x"), uri, nodes=3)
    stg.check_cluster_storage(stg.resolve_storage("/mnt/shared/x"), None, nodes=3, tracked=False)  # untracked run


def test_multi_node_refuses_the_jobs_working_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    with pytest.raises(StorageError, match="inside the job's working directory"):
        stg.check_cluster_storage(stg.resolve_storage(str(tmp_path / "results")), "http://h:5000", nodes=2)
    stg.check_cluster_storage(stg.resolve_storage(str(tmp_path.parent / "elsewhere")), "http://h:5000", nodes=2)


def test_ray_client_is_refused_with_the_alternative() -> None:
    with pytest.raises(StorageError, match=r"\(ray://\) is not supported.*ray job submit"):
        stg.check_address("ray://head:10001")
    stg.check_address("auto")
    stg.check_address(None)


def test_cli_refuses_ray_client_before_creating_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from etbench.cli import main

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": {"task": {"kind": "image", "dataset": "digits"}}}))
    rc = main(["sweep", "run", str(grid), "--address", "ray://127.0.0.1:1", "--storage", str(tmp_path / "s")])
    assert rc == 2 and "Ray Client (ray://) is not supported" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# --- the node check -------------------------------------------------------------------------------------------------
def test_node_check_reports_marker_and_data_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = stg.resolve_storage(str(tmp_path / "shared"))
    marker, token = stg.write_marker(st)
    monkeypatch.setenv("ETBENCH_DATA", str(tmp_path / "no-data-here"))
    digits = {"kind": "image", "dataset": "digits", "root": None, "image_size": 224}
    mnist = {"kind": "image", "dataset": "mnist", "root": "mnist", "image_size": 224}
    ok = stg.node_check(marker, token, [digits])
    assert ok["problems"] == [] and len(ok["checksums"]["image dataset 'digits'"]) == 64
    bad = stg.node_check(marker, "another-token", [digits, mnist])
    assert any("not this sweep's token" in p for p in bad["problems"])
    assert any("image dataset 'mnist' (mnist) does not load here" in p and str(tmp_path / "no-data-here") in p
               for p in bad["problems"]), bad["problems"]
    stg.remove(marker)
    gone = stg.node_check(marker, token, [])
    assert any("is not visible here" in p for p in gone["problems"])
    with pytest.raises(StorageError, match="not visible here"):
        stg.check_marker(marker, token)


def test_a_trial_on_a_node_without_the_storage_refuses_before_any_work(tmp_path: Path) -> None:
    """A trial that lands where the sweep's marker is not visible (a node the autoscaler added without the shared
    mount) refuses before it opens a run or writes a file — here the marker is gone, as on such a node. (Issue 23's
    mutation check: with run_trial's check_marker call removed, this trial trains and this test fails.)"""
    from etbench.sweep import runner
    from etbench.sweep.grid import expand, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "models": ["et"], "seeds": [0], "base": {
        "task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
        "train": {"epochs": 1, "batch_size": 16}}}))
    spec = load_grid(grid)
    st = stg.resolve_storage(str(tmp_path / "shared"))
    marker, token = stg.write_marker(st)
    stg.remove(marker)  # what a node that does not mount the storage sees
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    payload = runner._trial_payload(expand(spec)[0], spec, uri, "g", st, False, None, marker=(marker, token))
    with pytest.raises(StorageError, match="does not mount the shared storage"):
        runner.run_trial(payload)
    assert not Path(payload["out"]).exists() and not (tmp_path / "m.db").exists()


def test_dataset_refs_are_distinct_loader_arguments() -> None:
    a = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}})
    b = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}, "train": {"seed": 3}})
    g = resolve_run_config({"task": {"kind": "graph", "dataset": "synthetic"}})
    refs = stg.dataset_refs([a, b, g])
    assert [r["dataset"] for r in refs] == ["digits", "synthetic"]
    assert stg.probe_dataset(refs[1]) == "generated"


@pytest.mark.slow
def test_preflight_on_a_local_ray_names_the_node_that_lacks_the_data(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from etbench.sweep.runner import init_ray

    monkeypatch.setenv("ETBENCH_DATA", str(tmp_path / "empty"))  # forwarded to the workers by init_ray
    st = stg.resolve_storage(str(tmp_path / "shared"))
    ok_cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}})
    bad_cfg = resolve_run_config({"task": {"kind": "image", "dataset": "mnist", "root": "mnist"}})
    assert init_ray(None, use_gpu=False)
    try:
        marker, token = stg.preflight(st, [ok_cfg])
        assert stg.read_text(marker).strip() == token  # stays for the trials' own checks
        stg.remove(marker)
        with pytest.raises(StorageError) as err:
            stg.preflight(st, [ok_cfg, bad_cfg])
        msg = str(err.value)
        assert "node 127.0.0.2" in msg and "image dataset 'mnist' (mnist) does not load here" in msg, msg
        assert not list((tmp_path / "shared" / stg.MARKER_DIR).iterdir())  # a failed pre-flight leaves no marker
    finally:
        ray.shutdown()


# --- per-trial resources ----------------------------------------------------------------------------------------
def _trial(dist: dict, custom: dict | None = None) -> dict:
    return {"trial": {"config": {"dist": dist}, "custom": custom or {}}}


@pytest.mark.parametrize(("dist", "custom", "bundle"), [
    ({"workers": 1, "cpus_per_worker": 2}, None, {"CPU": 2.0}),
    ({"workers": 1, "cpus_per_worker": 1, "use_gpu": True}, None, {"CPU": 1.0, "GPU": 1.0}),
    ({"workers": 1, "use_gpu": True, "deepspeed": True}, None, {"CPU": 0.1}),  # no GPU held for the driver
    ({"workers": 4, "cpus_per_worker": 8, "use_gpu": True, "deepspeed": True}, None, {"CPU": 0.1}),
    ({"workers": 1}, {"slot": 1.0}, {"CPU": 1.0, "slot": 1.0}),
])
def test_trial_resources_follow_each_trials_own_config(dist: dict, custom: dict | None, bundle: dict) -> None:
    from etbench.sweep.runner import trial_resources

    pgf = trial_resources(_trial(dist, custom))
    assert pgf.bundles == [bundle]


def test_mixed_grid_gets_one_placement_per_trial(tmp_path: Path) -> None:
    from etbench.sweep.grid import expand, load_grid
    from etbench.sweep.runner import _trial_payload, trial_resources

    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"name": "mixed", "base": {"task": {"kind": "image", "dataset": "digits"}},
                                    "axes": {"dist.workers": [1, 4], "dist.deepspeed": [False, True]}}))
    spec = load_grid(path)
    bundles = {}
    for t in expand(spec):
        p = _trial_payload(t, spec, "sqlite:///x.db", "mixed", tmp_path / "r", False, None)
        bundles[(t.config.dist.workers, t.config.dist.deepspeed)] = trial_resources({"trial": p}).bundles
    assert bundles[(1, False)] == [{"CPU": 1.0}]
    assert bundles[(1, True)] == bundles[(4, True)] == [{"CPU": 0.1}]


# --- admission ------------------------------------------------------------------------------------------------------
HEAD = NodeType("node 10.0.0.1", {"CPU": 8.0}, 1, True)
GPU_TYPE = NodeType("node type gpu", {"CPU": 8.0, "GPU": 1.0}, 4, False)


def _gpu_run(workers: int, cpus: float = 4) -> object:
    return resolve_run_config({"task": {"kind": "image", "dataset": "digits"},
                               "dist": {"workers": workers, "cpus_per_worker": cpus, "use_gpu": True,
                                        "deepspeed": True}})


def test_a_trial_the_cluster_holds_once_scaled_is_admitted() -> None:
    check_fits(_gpu_run(4), [HEAD, GPU_TYPE])  # zero GPU nodes now, four possible


def test_a_trial_no_node_type_can_hold_is_refused_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        check_fits(_gpu_run(1, cpus=16), [HEAD, GPU_TYPE])
    msg = str(err.value)
    assert "one worker needs {CPU: 16, GPU: 1}" in msg and "node type gpu {CPU: 8, GPU: 1} (autoscaler max 4)" in msg
    with pytest.raises(ConfigError, match="need 5 such slots; the cluster can hold at most 4 once scaled"):
        check_fits(_gpu_run(5), [HEAD, GPU_TYPE])
    with pytest.raises(ConfigError, match="which no node or node type has"):
        check_fits(_gpu_run(1), [HEAD])  # no autoscaler: GPUs never come


def test_admission_reads_the_shipped_aws_cluster_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    from etbench.admission import _yaml_types

    monkeypatch.setenv("ETBENCH_CLUSTER_CONFIG", str(REPO / "cluster" / "aws-gpu.yaml"))
    types = _yaml_types()
    gpu = [t for t in types if t.resources.get("GPU", 0) >= 1]
    assert gpu and all(not t.alive and t.max_count >= 1 for t in gpu)
    check_fits(_gpu_run(2, cpus=2), types)
    monkeypatch.setenv("ETBENCH_CLUSTER_CONFIG", "/nonexistent.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        _yaml_types()


# --- provenance -------------------------------------------------------------------------------------------------
def test_provenance_is_this_checkout_or_what_the_submitter_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(stg.ENV_GIT_COMMIT, raising=False)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    p = stg.client_provenance()
    assert p[stg.ENV_GIT_COMMIT] == head and p[stg.ENV_GIT_DIRTY] in ("true", "false")
    monkeypatch.setenv(stg.ENV_GIT_COMMIT, "abc123")
    monkeypatch.setenv(stg.ENV_GIT_DIRTY, "true")
    assert stg.client_provenance() == {stg.ENV_GIT_COMMIT: "abc123", stg.ENV_GIT_DIRTY: "true"}
    env = stg.worker_env_vars(use_gpu=True)
    assert env[stg.ENV_GIT_COMMIT] == "abc123" and "DS_ACCELERATOR" not in env
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "etbench.storage", "runtime-env",
                          str(REPO / "cluster" / "runtime_env.yaml")], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ})
    job = json.loads(out.stdout)
    assert job["working_dir"] == "." and job["env_vars"][stg.ENV_GIT_COMMIT] == "abc123"


def test_a_runs_git_tags_come_from_the_submitter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from etbench.tracking.mlflow_log import RunTracker

    monkeypatch.setenv(stg.ENV_GIT_COMMIT, "0123456789abcdef")
    monkeypatch.setenv(stg.ENV_GIT_DIRTY, "false")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = RunTracker(uri, "e", "r", tmp_path / "art")
    run_id = tracker.start(resolve_run_config({"task": {"kind": "image", "dataset": "digits"}}), grid="g", axes={})
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["etbench.git_commit"] == "0123456789abcdef" and tags["etbench.git_dirty"] == "false"


def test_job_env_extra_adds_only_what_the_job_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"ETBENCH_DATA": "/job/data"}}}))
    assert stg.job_env_extra({"ETBENCH_DATA": "/driver/data", "ETBENCH_GIT_COMMIT": "c"}) == {
        "ETBENCH_GIT_COMMIT": "c"}


@pytest.mark.slow
def test_a_uri_storage_holds_tune_state_and_deepspeed_checkpoints(tmp_path: Path) -> None:
    """A ``file://`` URI goes the pyarrow/Ray URI way (as s3:// would): never resolved, Tune state and the
    DeepSpeed trial's Ray Train checkpoints land under it; trial folders live in node-local scratch."""
    import shutil

    from mlflow.tracking import MlflowClient

    from etbench.sweep.runner import local_root, run_sweep

    real = tmp_path / "bucket"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)  # a resolved path would read .../bucket, not .../link
    uri = f"file://{tmp_path / 'link'}/etb"
    grid = tmp_path / "uri.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "uri_grid", "models": ["et"], "axes": {"dist.workers": [1, 2]}, "max_concurrent_trials": 1,
        "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
                 "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}},
        "resources": {"cpus_per_worker": 0.5}}))
    with pytest.raises(StorageError, match="is a URI: give --tracking-uri"):
        run_sweep(grid, storage=uri, progress=False)
    db = f"sqlite:///{tmp_path / 'm.db'}"
    res = run_sweep(grid, storage=uri, tracking_uri=db, progress=False)
    try:
        assert res.storage == uri and len(res.finished) == 2 and not res.failed, res
        assert list((real / "etb" / "ray").glob("uri_grid-*"))  # the Tune experiment
        ds = [h for h in res.finished if list((real / "etb" / "uri_grid" / "trials" / h / "ray").glob(
            "etbench-*/checkpoint_*"))]
        assert len(ds) == 1  # the 2-worker DeepSpeed trial checkpointed into the URI storage
        for h in res.finished:
            assert (local_root(stg.resolve_storage(uri)) / "uri_grid" / "trials" / h / "summary.json").is_file()
        exp = MlflowClient(db).get_experiment_by_name("uri_grid")
        assert exp is not None
        every = MlflowClient(db).search_runs([exp.experiment_id])
        (parent,) = [r for r in every if r.data.tags.get("etbench.kind") == "grid"]  # issue 28.2
        runs = [r for r in every if r.info.run_id != parent.info.run_id]
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"] and parent.info.status == "FINISHED"
        # both trials (the DeepSpeed one's run opened by its driver) are the grid's children; the URI storage names it
        assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parent.info.run_id}
        assert json.loads((real / "etb" / "uri_grid" / "grid_run.json").read_text())["run_id"] == parent.info.run_id
    finally:
        for h in res.finished:
            shutil.rmtree(local_root(stg.resolve_storage(uri)) / "uri_grid" / "trials" / h, ignore_errors=True)
