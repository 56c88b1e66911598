"""Proof on one machine that grids run on Ray nodes that share no disk (issue 12).

A two-node loopback cluster: the head (127.0.0.2) in this mount namespace, the worker (127.0.0.3) in its own
(``unshare --mount --propagation private``, needs root). Inside the worker's namespace a private tmpfs covers the
whole test directory — the head's Ray temp dir, the MLflow server's store, the job files, a head-only data copy —
and only ``shared/`` is bind-mounted back in: the NFS mount of a real cluster. Grids go in with
``ray job submit --working-dir .`` (the repository; the job runs this venv's python) and log to an MLflow server
on 127.0.0.1. Checked:

- a relative ``--results`` and a SQLite tracking URI are refused before any trial starts, naming the setting;
- a dataset that only the head has is reported for node 127.0.0.3 before any trial starts;
- one-worker trials pinned to the worker node (a custom resource only it has: placement by resource, not by
  timing) are FINISHED in the head's server store and shared storage with the submitter's git commit;
- a 2-worker DeepSpeed trial that spans both nodes checkpoints to the shared storage; its worker node is killed by
  PID mid-trial and restarted, and ``--resume`` finishes it from the shared checkpoint with no config hash
  FINISHED twice.

Everything the fixture starts is stopped by PID (the worker's session, the processes naming this test's directory
or GCS address); no other Ray on the machine is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from test_cluster import BIN, CLUSTER, HEAD_IP, REPO, WORKER_IP, free_port, processes_matching, stop, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                                   reason="needs root and unshare for a private mount namespace")]
TINY = {"task": {"kind": "image", "dataset": "digits", "limit_train": 96, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}
NODE_CPUS = 2  # per node; a 1.5-CPU worker fits once per node, so a 2-worker trial must span both
WORKER_SLOT = "etbench_test_worker_node"  # a custom resource only the worker node has


@dataclass
class MultiNode:
    base: Path
    shared: Path
    gcs: str
    dashboard: str
    tracking_uri: str
    env: dict[str, str]
    worker_cmd: list[str]
    worker: subprocess.Popen | None = None
    started: dict[int, psutil.Process] = field(default_factory=dict)

    def start_worker(self) -> None:
        log = (self.base / "job" / f"worker-{time.time_ns()}.log").open("w")
        self.worker = subprocess.Popen(self.worker_cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and self.alive_nodes() < 2:
            assert self.worker.poll() is None, f"worker node exited {self.worker.returncode}: {log.name}"
            time.sleep(1)
        assert self.alive_nodes() == 2, "the worker node did not join"

    def kill_worker(self) -> None:
        """SIGKILL every process of the worker node's session (raylet, its workers, agents) — a node lost."""
        assert self.worker is not None
        sid = self.worker.pid
        procs = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == sid:
                    procs.append(p)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.worker.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and self.alive_nodes() > 1:
            time.sleep(1)

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        try:
            return sum(n.state == "ALIVE" for n in list_nodes(address=self.dashboard))
        except Exception:
            return 0


@pytest.fixture(scope="module")
def multinode() -> Iterator[MultiNode]:
    if not (BIN / "ray").exists() or not (BIN / "mlflow").exists():
        pytest.skip(f"ray/mlflow CLIs not found in {BIN}")
    base = Path(tempfile.mkdtemp(prefix="etbm-", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    stage = Path(tempfile.mkdtemp(prefix="etbm-stage-", dir="/tmp"))  # where `shared` is re-bound from
    for d in ("h", "shared", "mlflow", "job", "headonly/data"):
        (base / d).mkdir(parents=True)
    (base / "headonly" / "data" / "mnist").symlink_to(REPO.parent / "shared" / "data" / "mnist")
    default_address_file = Path("/tmp/ray/ray_current_cluster")
    address_before = default_address_file.read_text() if default_address_file.exists() else None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "TQDM_DISABLE": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    gcs_port, dash_port, ml_port = free_port(), free_port(), free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    started: dict[int, psutil.Process] = {}
    mlflow_log = base / "job" / "mlflow.log"
    mlflow = subprocess.Popen(
        ["bash", str(CLUSTER / "mlflow_server.sh"), "--store", str(base / "mlflow"), "--port", str(ml_port)],
        env={**env, "MLFLOW_BIN": str(BIN / "mlflow")}, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    started[mlflow.pid] = psutil.Process(mlflow.pid)
    common = [f"--num-cpus={NODE_CPUS}", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={base / 'h'}", *common]
    ray_start = " ".join([str(BIN / "ray"), "start", f"--address={gcs}", f"--node-ip-address={WORKER_IP}",
                          f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={base / 'w'}", "--block",
                          f"--resources='{json.dumps({WORKER_SLOT: 2})}'", *common])
    # the worker's own disk: a tmpfs over the whole test directory, with only `shared` bound back in
    script = (f"set -e; mount --bind {base / 'shared'} {stage}; mount -t tmpfs tmpfs {base}; "
              f"mkdir -p {base / 'shared'} {base / 'w'}; mount --bind {stage} {base / 'shared'}; "
              f"mkdir -p /tmp/ray; mount -t tmpfs tmpfs /tmp/ray; exec {ray_start}")
    worker_cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
    needles = [str(base), f"--address={gcs}"]
    mn = MultiNode(base, base / "shared", gcs, f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{ml_port}", env,
                   worker_cmd, started=started)
    try:
        r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        started.update(processes_matching(needles))
        assert r.returncode == 0, f"head failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        wait_http(f"{mn.dashboard}/api/version", 90)
        mn.start_worker()
        wait_http(f"{mn.tracking_uri}/health", 90, mlflow, mlflow_log)
        started.update(processes_matching(needles))
        yield mn
    finally:
        if mn.worker is not None and mn.worker.poll() is None:
            mn.kill_worker()
        started.update(processes_matching(needles))
        survivors = stop(started)
        mlflow.wait(timeout=5)
        if default_address_file.exists() and gcs in default_address_file.read_text():
            if address_before is None:
                default_address_file.unlink()
            else:
                default_address_file.write_text(address_before)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        assert not survivors, f"processes this test started are still alive: {survivors}"


# --- submitting ---------------------------------------------------------------------------------------------------
def write_grid(mn: MultiNode, name: str, **over: Any) -> Path:
    spec = {"name": name, "base": TINY, "models": ["et"], "seeds": [0], "max_concurrent_trials": 2, **over}
    path = mn.base / "job" / f"{name}.yaml"  # read by the driver only, which runs on the head
    path.write_text(yaml.safe_dump(spec))
    return path


def submit(mn: MultiNode, grid: Path | None, *args: str, data: Path | None = None,
           timeout: float = 420) -> tuple[str, str]:
    """`ray job submit --working-dir .` of `etbench sweep run GRID …` (``grid`` None: of `etbench ARGS`);
    returns (final status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from etbench.storage import job_runtime_env

    runtime_env = job_runtime_env(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    runtime_env["env_vars"].update({"ETBENCH_DATA": str(data or REPO.parent / "shared" / "data"),
                                    "DS_ACCELERATOR": "cpu"})
    sid = f"etbench-mn-{grid.stem if grid else 'cli'}-{time.time_ns()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", mn.dashboard, "--submission-id", sid, "--no-wait",
           "--runtime-env-json", json.dumps(runtime_env), "--working-dir", ".", "--", sys.executable, "-m",
           "etbench.cli", *(["sweep", "run", str(grid), "--address", "auto", "--tracking-uri", mn.tracking_uri]
                            if grid is not None else []), *args]
    r = subprocess.run(cmd, env=mn.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    client = JobSubmissionClient(mn.dashboard)
    deadline = time.time() + timeout
    status = client.get_job_status(sid)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(sid)
    if status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        client.stop_job(sid)
    return str(status), client.get_job_logs(sid)


def runs_of(mn: MultiNode, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    ml = MlflowClient(mn.tracking_uri)
    exp = ml.get_experiment_by_name(experiment)
    runs = [] if exp is None else list(ml.search_runs([exp.experiment_id]))
    return [r for r in runs if r.data.tags.get("etbench.kind") != "grid"]  # the grid's parent run holds no trial


def head_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


# --- refused before anything starts -------------------------------------------------------------------------------
def test_node_local_settings_are_refused_before_any_trial(multinode: MultiNode) -> None:
    grid = write_grid(multinode, "mn_refused", axes={"model.et.steps": [1, 2]})
    status, logs = submit(multinode, grid, "--results", "results")
    assert status == "FAILED", logs[-3000:]
    assert "--results is the relative path 'results'" in logs and "NFS/EFS/Lustre" in logs, logs[-3000:]
    db = multinode.shared / "m.db"
    status, logs = submit(multinode, grid, "--storage", str(multinode.shared), "--tracking-uri", f"sqlite:///{db}")
    assert status == "FAILED" and f"--tracking-uri sqlite:///{db} is a file store" in logs, logs[-3000:]
    assert runs_of(multinode, "mn_refused") == [] and not db.exists()
    assert not (multinode.shared / "mn_refused" / "trials").exists() and not (multinode.shared / "ray").exists()
    # `etbench train` on the cluster: its default --out is relative too
    status, logs = submit(multinode, None, "train", "image", "--dataset", "digits", "--limit-train", "64",
                          "--epochs", "1", "--workers", "2", "--address", "auto", "--tracking-uri",
                          multinode.tracking_uri, "--experiment", "mn_train")
    assert status == "FAILED" and "--out is the relative path 'results/runs/image-et-" in logs, logs[-3000:]
    assert runs_of(multinode, "mn_train") == []


def test_a_dataset_missing_on_the_worker_is_reported_by_node(multinode: MultiNode) -> None:
    base = {**TINY, "task": {"kind": "image", "dataset": "mnist", "root": "mnist", "limit_train": 64,
                             "limit_eval": 32}}
    grid = write_grid(multinode, "mn_nodata", base=base, axes={"model.et.steps": [1]})
    status, logs = submit(multinode, grid, "--storage", str(multinode.shared),
                          data=multinode.base / "headonly" / "data")  # present on the head only
    assert status == "FAILED", logs[-3000:]
    assert "cluster pre-flight failed" in logs and f"node {WORKER_IP}" in logs, logs[-3000:]
    assert "image dataset 'mnist' (mnist) does not load here" in logs, logs[-3000:]
    assert f"node {HEAD_IP} (" not in logs  # the head has it
    assert runs_of(multinode, "mn_nodata") == [] and not (multinode.shared / "mn_nodata" / "trials").exists()


# --- trials on the worker node, one shared store -----------------------------------------------------------------
def test_trials_on_the_worker_node_all_finished_in_one_store_with_the_commit(multinode: MultiNode) -> None:
    """Both trials are pinned to the worker node by a resource only it has. (Left to Ray, two short trials do not
    reliably use both nodes: Tune's actor reuse hands the second trial the head's actor when the first ends before
    the worker's actor has started.) The head runs trials in the DeepSpeed test below, whose two workers cannot
    share a node."""
    from etbench.sweep.grid import expand, load_grid

    grid = write_grid(multinode, "mn_both", axes={"model.et.steps": [1, 2]},
                      resources={"workers": 1, "cpus_per_worker": 1.0, "custom": {WORKER_SLOT: 1}})
    commit = head_commit()
    status, logs = submit(multinode, grid, "--storage", str(multinode.shared))
    assert status == "SUCCEEDED", logs[-4000:]
    assert "pre-flight: 2 node(s) see storage" in logs and "2 finished, 0 failed" in logs, logs[-3000:]
    rows = [json.loads(line) for f in multinode.shared.glob("ray/mn_both-*/*/result.json")
            for line in f.read_text().splitlines()]
    assert len(rows) >= 2 and {row["node_ip"] for row in rows} == {WORKER_IP}, rows
    planned = {t.config_hash for t in expand(load_grid(grid))}
    runs = runs_of(multinode, "mn_both")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["etbench.config_hash"] for r in runs} == planned
    for r in runs:  # the working-dir copy has no .git: the commit came from the submitter
        assert r.data.tags["etbench.git_commit"] == commit and r.data.tags["etbench.git_dirty"] in ("true", "false")
        h = r.data.tags["etbench.config_hash"]
        assert (multinode.shared / "mn_both" / "trials" / h / "summary.json").is_file()  # written on the worker


def test_deepspeed_trial_across_both_nodes_resumes_after_losing_a_node(multinode: MultiNode) -> None:
    from ray.util.state import list_actors

    base = {**TINY, "task": {**TINY["task"], "limit_train": 512},
            "train": {**TINY["train"], "epochs": 6, "checkpoint_every": 1, "batch_size": 64},
            "dist": {"max_failures": 0}}  # losing a node fails the trial at once (no waiting for its return)
    grid = write_grid(multinode, "mn_ds", base=base, axes={"model.et.steps": [2]}, max_failures=0,
                      resources={"workers": 2, "cpus_per_worker": 1.5, "zero_stage": 1})
    trials = multinode.shared / "mn_ds" / "trials"
    from ray.job_submission import JobSubmissionClient

    from etbench.storage import job_runtime_env

    # submit without waiting: kill the worker node once the first checkpoint is in the shared storage
    runtime_env = job_runtime_env(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    runtime_env["env_vars"].update({"ETBENCH_DATA": str(REPO.parent / "shared" / "data"), "DS_ACCELERATOR": "cpu"})
    client = JobSubmissionClient(multinode.dashboard)
    sid = client.submit_job(entrypoint=" ".join([sys.executable, "-m", "etbench.cli", "sweep", "run", str(grid),
                                                 "--address", "auto", "--tracking-uri", multinode.tracking_uri,
                                                 "--storage", str(multinode.shared)]),
                            runtime_env={**runtime_env, "working_dir": str(REPO)})
    def committed() -> bool:  # a checkpoint Ray Train has registered (its manager snapshot names it)
        return any("checkpoint_" in f.read_text() for f in
                   trials.glob("*/ray/etbench-*/checkpoint_manager_snapshot.json"))

    deadline = time.time() + 420
    spans: set[str] = set()
    while time.time() < deadline and not committed():
        workers = [a for a in list_actors(address=multinode.dashboard, filters=[("state", "=", "ALIVE")])
                   if "TrainWorker" in (a.class_name or "")]
        spans |= {a.node_id for a in workers}
        assert client.get_job_status(sid) in ("PENDING", "RUNNING"), client.get_job_logs(sid)[-4000:]
        time.sleep(1)
    assert committed() and list(trials.glob("*/ray/etbench-*/checkpoint_*")), client.get_job_logs(sid)[-4000:]
    assert len(spans) == 2, f"the DeepSpeed workers ran on {spans}"
    (run,) = runs_of(multinode, "mn_ds")
    assert run.info.status == "RUNNING"  # mid-trial
    multinode.kill_worker()
    ended = time.time() + 240
    while client.get_job_status(sid) in ("PENDING", "RUNNING") and time.time() < ended:
        time.sleep(2)
    first_logs = client.get_job_logs(sid)
    assert "0 finished, 1 failed" in first_logs, first_logs[-4000:]  # the lost node failed the trial
    assert all(r.info.status != "FINISHED" for r in runs_of(multinode, "mn_ds"))

    multinode.start_worker()
    status, logs = submit(multinode, grid, "--storage", str(multinode.shared), "--resume")
    assert status == "SUCCEEDED" and "1 finished, 0 failed" in logs, logs[-4000:]
    runs = runs_of(multinode, "mn_ds")
    finished = [r.data.tags["etbench.config_hash"] for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 1, [(r.info.status, r.data.tags) for r in runs]
    summary = json.loads((trials / finished[0] / "summary.json").read_text())
    assert summary["distributed"]["workers"] == 2 and summary["distributed"]["resumed_from_epoch"] >= 1
    history = json.loads((trials / finished[0] / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [float(e) for e in range(1, 7)]
