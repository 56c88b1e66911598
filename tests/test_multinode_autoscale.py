"""Autoscaling-aware admission, for real: Ray's own autoscaler with fake nodes (``provider: fake_multinode``, what
``ray.cluster_utils.AutoscalingCluster`` drives) on a loopback head that starts with no node of the needed type.

A custom resource ``slot`` stands in for GPUs: the head has none, the node type ``slot_node`` (0 nodes at
submission, at most 1) has one. A grid whose trials need ``slot`` is admitted and queued, the autoscaler adds the
node, the trials finish; a trial bigger than any node type is refused before anything starts, with the numbers.

``AutoscalingCluster.start()`` itself runs ``ray stop --force`` (every Ray on the machine) and its template YAML is
not in the wheel, so the head is started here the same way it does (``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=…``) and everything it starts is stopped by PID. The admission reads the node types from the
autoscaler config (``$ETBENCH_CLUSTER_CONFIG``, as ``~/ray_bootstrap_config.yaml`` on a launcher-made head).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from test_cluster import BIN, CLUSTER, HEAD_IP, free_port, processes_matching, stop, wait_http

pytestmark = pytest.mark.slow
TINY = {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}


def autoscaler_config(gcs: str) -> dict:
    return {
        "cluster_name": "etbench-fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "slot_node": {"resources": {"CPU": 2, "slot": 1}, "node_config": {}, "min_workers": 0,
                          "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


@dataclass
class Autoscaling:
    base: Path
    gcs: str
    tracking_uri: str


@pytest.fixture(scope="module")
def autoscaling() -> Iterator[Autoscaling]:
    if not (BIN / "ray").exists() or not (BIN / "mlflow").exists():
        pytest.skip(f"ray/mlflow CLIs not found in {BIN}")
    base = Path(tempfile.mkdtemp(prefix="etba-", dir="/tmp"))
    default_address_file = Path("/tmp/ray/ray_current_cluster")
    address_before = default_address_file.read_text() if default_address_file.exists() else None
    gcs_port, ml_port = free_port(), free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    cfg = base / "autoscaler.json"
    cfg.write_text(json.dumps(autoscaler_config(gcs)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    started: dict[int, psutil.Process] = {}
    mlflow_log = base / "mlflow.log"
    mlflow = subprocess.Popen(
        ["bash", str(CLUSTER / "mlflow_server.sh"), "--store", str(base / "mlflow"), "--port", str(ml_port)],
        env={**env, "MLFLOW_BIN": str(BIN / "mlflow")}, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    started[mlflow.pid] = psutil.Process(mlflow.pid)
    head = [str(BIN / "ray"), "start", "--head", f"--autoscaling-config={cfg}", f"--node-ip-address={HEAD_IP}",
            f"--port={gcs_port}", "--num-cpus=1", f"--temp-dir={base / 'ray'}", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats"]
    needles = [str(base), gcs, f"127.0.0.2:{gcs_port}"]
    try:
        r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        started.update(processes_matching(needles))
        assert r.returncode == 0, f"head failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        wait_http(f"http://127.0.0.1:{ml_port}/health", 90, mlflow, mlflow_log)
        started.update(processes_matching(needles))
        yield Autoscaling(base, gcs, f"http://127.0.0.1:{ml_port}")
    finally:
        started.update(processes_matching(needles))  # plus the nodes the autoscaler launched since
        survivors = stop(started)
        mlflow.wait(timeout=5)
        if default_address_file.exists() and gcs in default_address_file.read_text():
            if address_before is None:
                default_address_file.unlink()
            else:
                default_address_file.write_text(address_before)
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes this test started are still alive: {survivors}"


def _grid(a: Autoscaling, name: str, cpus: float) -> Path:
    path = a.base / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": TINY, "models": ["et"], "axes": {"model.et.steps": [1, 2]},
                                    "resources": {"workers": 1, "cpus_per_worker": cpus, "custom": {"slot": 1}},
                                    "max_concurrent_trials": 2}))
    return path


def _alive(a: Autoscaling) -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def test_trials_for_a_node_type_with_no_nodes_are_queued_until_it_is_added(
        autoscaling: Autoscaling, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from etbench.sweep.runner import run_sweep

    monkeypatch.setenv("ETBENCH_CLUSTER_CONFIG", str(autoscaling.base / "autoscaler.json"))
    ray.init(address=autoscaling.gcs, log_to_driver=False)
    try:
        before = _alive(autoscaling)
    finally:
        ray.shutdown()
    assert len(before) == 1 and "slot" not in before[0]["Resources"]  # nothing can run the trials yet
    t0 = time.time()
    res = run_sweep(_grid(autoscaling, "as_queued", 1.0), address=autoscaling.gcs, storage=str(autoscaling.base / "s"),
                    tracking_uri=autoscaling.tracking_uri, progress=False)
    assert sorted(res.finished) == sorted(set(res.finished)) and len(res.finished) == 2, res
    assert res.failed == {} and time.time() - t0 < 600
    ray.init(address=autoscaling.gcs, log_to_driver=False)
    try:
        after = _alive(autoscaling)
    finally:
        ray.shutdown()
    added = [n for n in after if n["Resources"].get("slot") == 1.0]
    assert len(added) == 1, after  # the autoscaler launched the slot node
    rows = [json.loads(line) for f in (autoscaling.base / "s").glob("ray/as_queued-*/*/result.json")
            for line in f.read_text().splitlines()]
    assert {r["node_ip"] for r in rows} == {added[0]["NodeManagerAddress"]}, rows
    ml = MlflowClient(autoscaling.tracking_uri)
    exp = ml.get_experiment_by_name("as_queued")
    assert exp is not None
    trials = [r for r in ml.search_runs([exp.experiment_id]) if r.data.tags.get("etbench.kind") != "grid"]
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]


def test_a_trial_no_node_type_can_hold_is_refused_up_front(autoscaling: Autoscaling,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from etbench.config import ConfigError
    from etbench.sweep.runner import run_sweep

    monkeypatch.setenv("ETBENCH_CLUSTER_CONFIG", str(autoscaling.base / "autoscaler.json"))
    with pytest.raises(ConfigError) as err:
        run_sweep(_grid(autoscaling, "as_toobig", 4.0), address=autoscaling.gcs, storage=str(autoscaling.base / "s"),
                  tracking_uri=autoscaling.tracking_uri, progress=False)
    msg = str(err.value)
    assert "one worker needs {CPU: 4, slot: 1}, which no node or node type has" in msg, msg
    assert "node type slot_node {CPU: 2, slot: 1} (autoscaler max 1)" in msg and f"node {HEAD_IP} {{CPU: 1" in msg
    assert MlflowClient(autoscaling.tracking_uri).get_experiment_by_name("as_toobig") is None
    assert not (autoscaling.base / "s" / "as_toobig" / "trials").exists()  # (only the library log file)
