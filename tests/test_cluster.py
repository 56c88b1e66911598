"""The cluster path, for real on one machine: a two-node loopback Ray cluster (`ray start` ×2), a local MLflow
tracking server, and a small sweep submitted with `ray job submit` using `cluster/runtime_env.yaml`.

Checks: the job SUCCEEDED, its two trials ran on both nodes (Tune's ``node_ip`` per trial), both runs are
FINISHED in the server's store with the grid's config hashes. Everything the test starts is stopped by PID (the
processes whose command line names this test's private Ray temp dir or GCS address, plus their descendants);
no other Ray process on the machine is touched. The cluster manifests are parsed and cross-checked, the MLflow
script's refusals are exercised, and the sweep benchmark's grids are checked to be one training step per trial.
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
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from etbench.testing.loopback_cluster import (
    BIN,
    CLUSTER,
    HEAD_IP,
    REPO,
    WORKER_IP,
    free_port,
    processes_matching,
    wait_http,
)
from etbench.testing.loopback_cluster import stop_processes as stop

GRID = {
    "name": "cluster_smoke",
    "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
             "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}},
    "models": ["et"],
    "axes": {"model.et.steps": [1, 2]},
    "seeds": [0],
    "resources": {"workers": 1, "cpus_per_worker": 1},
    "max_concurrent_trials": 2,
}


# --- the manifests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["aws-gpu.yaml", "ray-cluster.k8s.yaml", "ray-job.k8s.yaml", "runtime_env.yaml"])
def test_cluster_yamls_parse(name: str) -> None:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_manifests_name_the_pieces_the_readme_relies_on() -> None:
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert aws["provider"]["type"] == "aws" and aws["head_node_type"] in aws["available_node_types"]
    gpu = [n for n in aws["available_node_types"].values() if n.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(n["max_workers"] >= 1 for n in gpu)
    assert any("pip install -e ." in c for c in aws["setup_commands"])
    docs = {d["kind"]: d for f in ("ray-cluster.k8s.yaml", "ray-job.k8s.yaml")
            for d in yaml.safe_load_all((CLUSTER / f).read_text()) if d}
    cluster, job = docs["RayCluster"], docs["RayJob"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    head_ports = {p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                  ["ports"]}
    assert {6379, 8265, 5000} <= head_ports
    entry = job["spec"]["entrypoint"]
    assert "--address auto" in entry and f"http://{cluster['metadata']['name']}-head-svc:5000" in entry
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and {"results/", ".venv/"} <= set(env["excludes"])
    assert "DS_ACCELERATOR" not in env["env_vars"]  # GPU clusters must not force the CPU accelerator
    assert env["env_vars"]["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] == "0" and "ETBENCH_DATA" in env["env_vars"]
    script = (CLUSTER / "mlflow_server.sh").read_text()
    assert "HOST=127.0.0.1" in script and "--workers 1" in script
    assert 'MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"' in script


def test_cluster_files_carry_the_multi_node_fixes() -> None:
    """Issue 12 point 9: pinned images and AMIs, no torch install per node, EFS writable by the container user and
    reachable (2049), fsGroup on the KubeRay pods, MLflow on persistent storage, a GPU grid in the RayJob, prebuilt
    DeepSpeed ops, token auth in the README's commands, and the Ray floor that is tested here."""
    from importlib.metadata import version

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile
    for needle in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1", 'TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"',
                   "ARG GIT_COMMIT", "ETBENCH_GIT_COMMIT=${GIT_COMMIT}"):
        assert needle in dockerfile, needle
    image = dockerfile.split("-t ", 1)[1].split()[0]  # the tag the build comment pushes
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert aws["docker"]["image"] == image and "--gpus all" in aws["docker"]["run_options"]
    assert all(t["node_config"].get("ImageId") for t in aws["available_node_types"].values())
    assert all("--no-deps" in c for c in aws["setup_commands"] if "pip install" in c)
    rules = aws["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] == 2049 == r["ToPort"] and r["IpProtocol"] == "tcp" for r in rules)
    init = " ".join(aws["initialization_commands"])
    assert "chown 1000:100 /mnt/shared/etbench-results" in init and "/mnt/shared/mlflow" in init
    docs = [d for f in ("ray-cluster.k8s.yaml", "ray-job.k8s.yaml") for d in
            yaml.safe_load_all((CLUSTER / f).read_text()) if d]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    job = next(d for d in docs if d["kind"] == "RayJob")
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"])]
    for pod in pods:
        assert pod["securityContext"]["fsGroup"] == 100 and pod["securityContext"]["runAsUser"] == 1000
        assert {c["image"] for c in pod["containers"]} == {image}
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image
    head = pods[0]
    mlflow = next(c for c in head["containers"] if c["name"] == "mlflow")
    store = mlflow["args"][mlflow["args"].index("--store") + 1]
    mount = next(m for m in mlflow["volumeMounts"] if m["mountPath"] == store)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim"
                 and d["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # a persistent block volume, not the container
    gpu_workers = [c for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] for c in gpu_workers)
    entry = job["spec"]["entrypoint"].split()
    assert entry[entry.index("--storage") + 1].startswith("/mnt/shared/")
    grid = yaml.safe_load((REPO / "experiments" / Path(entry[3]).name).read_text())
    assert grid["resources"]["use_gpu"] is True  # Ray hides a pod's GPUs from trials that ask for none
    readme = (CLUSTER / "README.md").read_text()
    for line in readme.splitlines():
        if "ray exec" in line and "ray status" in line:
            assert "RAY_AUTH_MODE=token ray status" in line, line
    floor = next(d for d in (REPO / "pyproject.toml").read_text().splitlines() if '"ray[' in d)
    assert ">=2.60," in floor and version("ray").startswith("2.60")


@pytest.mark.parametrize(("args", "needle"), [
    (["--expose"], "--expose needs --allowed-hosts"),
    (["--port", "fivethousand"], "--port must be a number"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_mlflow_script_refuses_unsafe_or_bad_options(tmp_path: Path, args: list[str], needle: str) -> None:
    r = subprocess.run(["bash", str(CLUSTER / "mlflow_server.sh"), "--store", str(tmp_path / "s"), *args],
                       capture_output=True, text=True, timeout=30, env={**os.environ, "MLFLOW_BIN": "false"})
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()  # refused before creating anything


# --- process plumbing: etbench.testing.loopback_cluster's (free_port, wait_http, processes_matching, stop) -------


@dataclass
class Stack:
    temp_dir: Path
    gcs: str
    dashboard: str
    tracking_uri: str
    env: dict[str, str]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two Ray nodes (head 127.0.0.2 + worker 127.0.0.3, 1 CPU each) and an MLflow server on 127.0.0.1."""
    if not (BIN / "ray").exists() or not (BIN / "mlflow").exists():
        pytest.skip(f"ray/mlflow CLIs not found in {BIN}")
    # a short private temp dir: Ray's unix socket paths must stay under 108 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="etbr-", dir="/tmp"))
    default_address_file = Path("/tmp/ray/ray_current_cluster")
    address_before = default_address_file.read_text() if default_address_file.exists() else None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "TQDM_DISABLE": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    gcs_port, dash_port, ml_port = free_port(), free_port(), free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    mlflow_log = tmp_path / "mlflow_server.log"
    started: dict[int, psutil.Process] = {}
    # the README's script, in the foreground (it execs `mlflow server`: sqlite store, 127.0.0.1, 1 worker)
    mlflow = subprocess.Popen(
        ["bash", str(CLUSTER / "mlflow_server.sh"), "--store", str(tmp_path / "mlflow"), "--port", str(ml_port)],
        env={**env, "MLFLOW_BIN": str(BIN / "mlflow")}, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    started[mlflow.pid] = psutil.Process(mlflow.pid)
    # every port a second cluster on this machine could collide on is chosen free (agent default 52365, client 10001)
    # one temp dir per node: nodes sharing one would share (and garbage-collect) the unpacked job working_dir
    common = ["--num-cpus=1", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir / 'h'}", *common]
    worker = [str(BIN / "ray"), "start", f"--address={gcs}", f"--node-ip-address={WORKER_IP}",
              f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir / 'w'}", *common]
    needles = [str(temp_dir), f"--address={gcs}", str(tmp_path / "mlflow")]
    try:
        for cmd in (head, worker):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            started.update(processes_matching(needles))  # record what `ray start` daemonised, node by node
            assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        wait_http(f"http://127.0.0.1:{ml_port}/health", 90, mlflow, mlflow_log)
        started.update(processes_matching(needles))  # the server's uvicorn worker
        wait_http(f"http://127.0.0.1:{dash_port}/api/version", 60)
        yield Stack(temp_dir, gcs, f"http://127.0.0.1:{dash_port}", f"http://127.0.0.1:{ml_port}", env)
    finally:
        started.update(processes_matching(needles))  # plus the workers, job supervisor and driver started since
        survivors = stop(started)
        mlflow.wait(timeout=5)
        if default_address_file.exists() and gcs in default_address_file.read_text():
            if address_before is None:
                default_address_file.unlink()  # only ever a file this test's cluster wrote
            else:
                default_address_file.write_text(address_before)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes this test started are still alive: {survivors}"


# --- the sweep through `ray job submit` -------------------------------------------------------------------------
def job_runtime_env(job_dir: Path, data_root: Path) -> dict:
    """cluster/runtime_env.yaml as the README uses it, pointed at this machine (CPU: DS_ACCELERATOR=cpu)."""
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env["working_dir"] = str(job_dir)
    env["env_vars"] = {**env["env_vars"], "ETBENCH_DATA": str(data_root), "DS_ACCELERATOR": "cpu"}
    return env


@pytest.mark.slow
def test_sweep_submitted_as_ray_job_runs_on_both_nodes(stack: Stack, tmp_path: Path, shared_data: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from etbench.sweep.grid import expand, load_grid

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "grid.yaml").write_text(yaml.safe_dump(GRID))
    results = tmp_path / "results"
    sid = f"etbench-cluster-test-{os.getpid()}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", stack.dashboard, "--submission-id", sid, "--no-wait",
           "--runtime-env-json", json.dumps(job_runtime_env(job_dir, shared_data)), "--working-dir", str(job_dir),
           "--", sys.executable, "-m", "etbench.cli", "sweep", "run", "grid.yaml", "--address", "auto",
           "--tracking-uri", stack.tracking_uri, "--results", str(results)]
    r = subprocess.run(cmd, env=stack.env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"

    client = JobSubmissionClient(stack.dashboard)
    deadline = time.time() + 180
    status = client.get_job_status(sid)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(sid)
    logs = client.get_job_logs(sid)
    if status != JobStatus.SUCCEEDED:
        client.stop_job(sid)
    assert status == JobStatus.SUCCEEDED, f"job {sid} ended {status}; logs:\n{logs[-6000:]}"

    # where each trial ran: Tune stamps every result with the trial actor's node IP
    rows = [json.loads(line) for f in results.glob("ray/*/*/result.json") for line in f.read_text().splitlines()]
    assert len(rows) == 2, rows
    assert {row["node_ip"] for row in rows} == {HEAD_IP, WORKER_IP}, rows
    assert all(row["status"] == "finished" for row in rows)

    # every run FINISHED in the server's store, one per planned config hash, with its metrics and artifacts
    planned = {t.config_hash for t in expand(load_grid(job_dir / "grid.yaml"))}
    ml = MlflowClient(stack.tracking_uri)
    exp = ml.get_experiment_by_name(GRID["name"])
    assert exp is not None
    runs = [r for r in ml.search_runs([exp.experiment_id]) if r.data.tags.get("etbench.kind") != "grid"]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert {r.data.tags["etbench.config_hash"] for r in runs} == planned
    for run in runs:
        hist = ml.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in hist] == [1] and all(0 < m.value < 10 for m in hist)
        assert "config.json" in {a.path for a in ml.list_artifacts(run.info.run_id)}
        assert (results / GRID["name"] / "trials" / run.data.tags["etbench.config_hash"] / "summary.json").is_file()


# --- the sweep benchmark's grids ------------------------------------------------------------------------------
def test_bench_grids_are_one_training_step_each(tmp_path: Path) -> None:
    import torch

    from etbench.bench.sweep import one_step_grid
    from etbench.engine.build import build_task
    from etbench.sweep.grid import expand, load_grid

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(one_step_grid("b", 3, workers=2, cpus_per_worker=0.45, concurrency=2)))
    trials = expand(load_grid(path))
    assert len(trials) == 3 and len({t.config_hash for t in trials}) == 3
    cfg = trials[0].config
    assert (cfg.dist.workers, cfg.dist.cpus_per_worker, cfg.train.epochs) == (2, 0.45, 1)
    assert [build_task(cfg, torch.device("cpu"), rank=r, world=2).num_train_batches() for r in (0, 1)] == [1, 1]
    with pytest.raises(ValueError, match="batch >= workers"):
        one_step_grid("b", 1, workers=4, batch=2)


def test_bench_speedup_grids_run_whole_epochs_of_real_work(tmp_path: Path) -> None:
    """The speed-up trials really train ``steps`` batches per epoch for ``epochs`` epochs (not one step)."""
    import torch

    from etbench.bench.sweep import one_step_grid
    from etbench.engine.build import build_task
    from etbench.sweep.grid import expand, load_grid

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(one_step_grid("s", 2, steps=40, epochs=4, batch=32)))
    cfg = expand(load_grid(path))[0].config
    assert cfg.train.epochs == 4 and cfg.dist.cpus_per_worker == 1.0
    assert build_task(cfg, torch.device("cpu")).num_train_batches() == 40
    with pytest.raises(ValueError, match="exceeds the digits training split"):
        one_step_grid("s", 1, steps=41, batch=32)


def test_bench_steady_state_cost_leaves_out_the_sweep_startup() -> None:
    from etbench.bench.sweep import steady_state

    s = steady_state({"start_unix": 100.0, "ends_unix": [130.0, 152.0, 173.0, 195.0]})
    assert s["completion_gaps_s"] == [22.0, 21.0, 22.0] and s["per_trial_s"] == 22.0
    assert s["first_trial_done_s"] == 30.0 and s["sweep_fixed_s"] == 8.0
    one = steady_state({"start_unix": 0.0, "ends_unix": [30.0]})
    assert one["per_trial_s"] is None and one["sweep_fixed_s"] is None
