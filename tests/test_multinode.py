"""Proof on one machine that grids run on Ray nodes that share no disk (issue 12).

A two-node loopback cluster: the head (127.0.0.2) in this mount namespace, the worker (127.0.0.3) in its own
(``unshare --mount --propagation private``, needs root). Inside the worker's namespace a private tmpfs covers the
whole test directory — the head's Ray temp dir, the MLflow server's store, the job files, a head-only data copy —
and only ``shared/`` is bind-mounted back in: the NFS mount of a real cluster. Grids go in with
``ray job submit --working-dir .`` (the repository; the job runs this venv's python) and log to an MLflow server
on 127.0.0.1. Checked:

- a relative ``--results`` and a SQLite tracking URI are refused before any trial starts, naming the setting;
- a dataset that only the head has is reported for node 127.0.0.3 before any trial starts;
- a 2-worker DeepSpeed trial that spans both nodes checkpoints to the shared storage; its worker node is killed by
  PID mid-trial and restarted, and ``--resume`` finishes it from the shared checkpoint with no config hash
  FINISHED twice;
- chaos (issue 23): a grid of one-worker trials pinned to the worker node (a custom resource only it has:
  placement by resource, not by timing), with the project's default retries, loses its worker node (SIGKILL, back
  10 s later: Ray Tune retries the trials it held), its driver (SIGKILL, then ``--resume``) and its tracking server
  (black-holed through a proxy, then restarted on the same store), each while a trial is mid-run after a
  checkpoint. Oracle from the store and the shared trial folders alone (:func:`etbench.testing.chaos.audit`):
  exactly one FINISHED run per planned config hash, none left RUNNING, every other run closed with a reason, each
  FINISHED run's per-epoch validation history holds every epoch once and equals ``metrics.json``, every trial a
  fault hit continued its own run (one MLflow run per trial over all its attempts), an interrupted trial ends
  bit-identical to the same config trained once uninterrupted, and every run carries the submitter's git commit
  and ran on the worker node.

Everything the fixture starts is stopped by PID (the worker's session, the processes naming this test's directory
or GCS address); no other Ray on the machine is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench.testing.chaos import audit, trial_progress
from etbench.testing.loopback_cluster import (
    BIN,
    CLUSTER,
    HEAD_IP,
    REPO,
    WORKER_IP,
    WORKER_SLOT,
    LoopbackCluster,
    can_run,
    loopback_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(can_run() is not None, reason=str(can_run()))]
TINY = {"task": {"kind": "image", "dataset": "digits", "limit_train": 96, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}
NODE_CPUS = 2  # per node; a 1.5-CPU worker fits once per node, so a 2-worker trial must span both


MultiNode = LoopbackCluster  # the cluster these tests run on (etbench.testing.loopback_cluster)


@pytest.fixture(scope="module")
def multinode() -> Iterator[LoopbackCluster]:
    with loopback_cluster(node_cpus=NODE_CPUS, worker_slots=2, proxy=True, prefix="etbm-") as cl:
        yield cl


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
    return finish(mn, start(mn, grid, *args, data=data), timeout)


def start(mn: MultiNode, grid: Path | None, *args: str, data: Path | None = None) -> str:
    """Submit as :func:`submit` does without waiting for the job; its submission id."""
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
    return sid


def finish(mn: MultiNode, sid: str, timeout: float = 420) -> tuple[str, str]:
    """A submitted job's final status and logs (stopped when ``timeout`` passes first)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

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
    db = multinode.shared / "m.db"
    jobs = [start(multinode, grid, "--results", "results"),  # the three are submitted together: each is refused
            start(multinode, grid, "--storage", str(multinode.shared), "--tracking-uri", f"sqlite:///{db}"),
            # `etbench train` on the cluster: its default --out is relative too
            start(multinode, None, "train", "image", "--dataset", "digits", "--limit-train", "64", "--epochs", "1",
                  "--workers", "2", "--address", "auto", "--tracking-uri", multinode.tracking_uri,
                  "--experiment", "mn_train")]
    (status, logs), (status2, logs2), (status3, logs3) = (finish(multinode, sid) for sid in jobs)
    assert status == "FAILED", logs[-3000:]
    assert "--results is the relative path 'results'" in logs and "NFS/EFS/Lustre" in logs, logs[-3000:]
    assert status2 == "FAILED" and f"--tracking-uri sqlite:///{db} is a file store" in logs2, logs2[-3000:]
    assert runs_of(multinode, "mn_refused") == [] and not db.exists()
    assert not (multinode.shared / "mn_refused" / "trials").exists() and not (multinode.shared / "ray").exists()
    assert status3 == "FAILED" and "--out is the relative path 'results/runs/image-et-" in logs3, logs3[-3000:]
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


# --- a DeepSpeed trial across both nodes ----------------------------------------------------------------------
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


# --- chaos: driver, node and tracking server lost while the grid runs ----------------------------------------
EPOCHS = 6
BLACKHOLE_S = 10  # `etbench bench chaos` holds the server for 90 s; here only long enough to stall a trial's calls
CHAOS_GRID = {"name": "chaos", "models": ["et"], "seeds": [0], "max_concurrent_trials": 2,
        "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 1024, "limit_eval": 32},
                 "train": {"epochs": EPOCHS, "batch_size": 64, "lr": 0.003, "eval_trace_samples": 2,
                           "checkpoint_every": 1}},
        "axes": {"model.et.steps": [1, 2, 3, 4]},
        "resources": {"workers": 1, "cpus_per_worker": 1.0, "custom": {WORKER_SLOT: 1}}}


progress = trial_progress  # (etbench.testing.chaos)


def wait_for(what: str, cond: Callable[[], Any], cl: LoopbackCluster, sid: str, timeout: float = 300) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        status = cl.status(sid)
        assert status in ("PENDING", "RUNNING"), f"job {status} before {what}:\n{cl.logs(sid)[-4000:]}"
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{cl.logs(sid)[-4000:]}")


def mid_trial(trials: Path, after: dict[str, tuple[int, bool]] | None = None) -> Callable[[], list[str]]:
    """Trials with a checkpoint newer than in ``after`` and no final summary yet: a fault now hits a trial mid-run."""
    def cond() -> list[str]:
        before = after or {}
        return [h for h, (epoch, done) in progress(trials).items()
                if epoch >= 1 and not done and epoch > before.get(h, (0, False))[0]]
    return cond


def test_a_grid_survives_driver_node_and_tracking_server_loss(multinode: LoopbackCluster, tmp_path: Path) -> None:
    cluster = multinode
    from etbench.config import RunConfig
    from etbench.engine.run import run_single
    from etbench.sweep.grid import expand, load_grid

    grid = cluster.base / "job" / "chaos.yaml"  # read by the driver, which runs on the head
    grid.write_text(yaml.safe_dump(CHAOS_GRID))
    trials = cluster.shared / "chaos" / "trials"
    planned = {t.config_hash: t for t in expand(load_grid(grid))}

    # 1. the worker node lost mid-trial and back 10 s later: Ray Tune retries the trials it held (no --resume yet:
    #    only the trial folder's tracking.json can lead a retry back to its run)
    sid = cluster.submit(cluster.sweep_args(grid))
    hit_node = wait_for("first checkpoint", mid_trial(trials), cluster, sid)
    cluster.kill_worker()
    time.sleep(10)
    cluster.start_worker()

    # 2. the driver lost mid-trial, the grid re-submitted with --resume
    hit_driver = wait_for("a checkpoint after the node came back", mid_trial(trials, progress(trials)), cluster, sid)
    cluster.kill_driver(sid)
    assert cluster.status(sid) in ("FAILED", "STOPPED")
    before = progress(trials)
    sid = cluster.submit(cluster.sweep_args(grid, "--resume"))

    # 3. the tracking server stops answering while a trial runs, then restarts on the same store
    hit_mlflow = wait_for("a checkpoint after --resume", mid_trial(trials, before), cluster, sid)
    cluster.proxy.set_mode("blackhole")
    time.sleep(BLACKHOLE_S)
    cluster.restart_mlflow()
    cluster.proxy.set_mode("pass")

    status = cluster.wait(sid, 600)
    logs = cluster.logs(sid)
    assert status == "SUCCEEDED", logs[-5000:]
    result = audit(cluster.direct_uri, "chaos", {h: EPOCHS for h in planned}, trials)
    assert result.problems == [], (result.as_dict(), logs[-3000:])
    assert result.finished == len(planned) == 4
    for h in {*hit_driver, *hit_node}:  # every trial a fault hit ran again and continued its own run
        assert result.attempts.get(h, 1) >= 2, (h, result.attempts)
    assert hit_mlflow
    runs_per_hash: dict[str, int] = {}
    for r in cluster.runs("chaos"):
        h = r.data.tags["etbench.config_hash"]
        runs_per_hash[h] = runs_per_hash.get(h, 0) + 1
    assert runs_per_hash == {h: 1 for h in planned}  # one run per trial over every attempt: none opened twice
    commit = head_commit()
    for r in cluster.runs("chaos"):  # the working-dir copy has no .git: the commit came from the submitter
        if r.info.status == "FINISHED":
            assert r.data.tags["etbench.git_commit"] == commit and r.data.tags["etbench.git_dirty"] in ("true", "false")
    rows = [json.loads(line) for f in cluster.shared.glob("ray/chaos-*/*/result.json")
            for line in f.read_text().splitlines()]
    assert rows and {row["node_ip"] for row in rows} == {WORKER_IP}, rows  # placed by resource on the worker node

    # an interrupted trial ends bit-identical to the same config trained once, uninterrupted
    import torch

    h = sorted(hit_node)[0]
    cfg = RunConfig.model_validate(planned[h].config.model_dump(mode="json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial (dist.cpus_per_worker 1): the same reductions, bit for bit
    try:
        ref = run_single(cfg, tmp_path / "ref", progress=False).state.history
    finally:
        torch.set_num_threads(threads)
    got = json.loads((trials / h / "metrics.json").read_text())
    for key in ("train/loss", "val/loss"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
