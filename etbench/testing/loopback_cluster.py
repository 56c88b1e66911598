"""A Ray cluster of loopback nodes that share no disk, an MLflow server, and the faults a real cluster has.

One machine stands in for a cluster (``../shared/docs/TOOLING.md`` §9): the head (``127.0.0.2``) runs in this
mount namespace; the worker (``127.0.0.3``) runs in its own (``unshare --mount --propagation private``, needs root)
where a private tmpfs covers the whole cluster folder and ``/tmp/ray``, and only ``shared/`` is bound back in — the
NFS mount of a real cluster. The MLflow server runs on ``127.0.0.1`` on a store in the cluster folder; with
``proxy=True`` every client reaches it through :class:`etbench.testing.tcp_proxy.TcpProxy`, which can refuse or
black-hole connections (a tracking server that is down, or up but not answering).

Faults, each by its own handle or PID (nothing is ever stopped by name): :meth:`LoopbackCluster.kill_worker` (a
node lost: SIGKILL of the worker node's whole session), :meth:`~LoopbackCluster.start_worker` (it comes back),
:meth:`~LoopbackCluster.kill_driver` (a sweep driver lost: SIGKILL of a job's driver process),
:meth:`~LoopbackCluster.restart_mlflow` (the tracking server restarted on the same store). The chaos test
(``tests/test_chaos.py``), the multi-node tests and ``etbench bench chaos`` all use it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent  # this venv: its ray/mlflow CLIs and python run every process
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # Ray rewrites 127.0.0.1 to the external interface
WORKER_SLOT = "etbench_test_worker_node"  # a custom resource only the worker node has: placement by resource
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class ClusterError(RuntimeError):
    """The loopback cluster could not be started or did not behave (a node did not join, a server did not answer)."""


def can_run() -> str | None:
    """Why this machine cannot host the cluster (None: it can)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare for a private mount namespace"
    if not (BIN / "ray").exists() or not (BIN / "mlflow").exists():
        return f"ray/mlflow CLIs not found in {BIN}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until ``url`` answers 200; a ClusterError (with the log's tail) when ``proc`` exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise ClusterError(f"{url}: the server exited with {proc.returncode} before answering:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ClusterError(f"{url} did not answer within {timeout:.0f} s")


def processes_matching(needles: list[str]) -> dict[int, psutil.Process]:
    """Processes whose command line contains a needle, and all their descendants (never this process's ancestry)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if p.pid in mine or not any(n in cmd for n in needles):
            continue
        found[p.pid] = p
        try:
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in mine})
        except psutil.NoSuchProcess:
            pass
    return found


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited — gone, or a zombie whose parent has not reaped it yet (a killed raylet's
    children are re-parented to PID 1, which may reap late: ``psutil.wait_procs`` would wait out its whole timeout
    for them). Our own children are reaped. Returns the ones still running at ``timeout``."""
    deadline = time.time() + timeout
    alive = list(procs)
    while True:
        _, alive = psutil.wait_procs(alive, timeout=0.2)  # reaps our own children
        running = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
            except psutil.NoSuchProcess:
                pass
        alive = running
        if not alive or time.time() >= deadline:
            return alive


def stop_processes(procs: dict[int, psutil.Process], grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left (raylet, gcs_server and the agents ignore SIGTERM). Returns survivors."""
    live = list(procs.values())
    for p in live:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    alive = wait_gone(live, grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in wait_gone(alive, 10)]


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` and wait for them."""
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
    wait_gone(procs, 10)


@dataclass
class LoopbackCluster:
    """A running cluster; build it with :func:`loopback_cluster`."""

    base: Path
    shared: Path
    gcs: str
    dashboard: str
    tracking_uri: str  # what clients use: the proxy's address when there is one
    env: dict[str, str]
    worker_cmd: list[str]
    mlflow_cmd: list[str]
    mlflow_port: int
    proxy: Any = None  # etbench.testing.tcp_proxy.TcpProxy
    worker: subprocess.Popen | None = None
    mlflow: subprocess.Popen | None = None
    started: dict[int, psutil.Process] = field(default_factory=dict)

    # --- nodes ----------------------------------------------------------------------------------------------------
    def start_worker(self, timeout: float = 120) -> None:
        log = (self.base / "job" / f"worker-{time.time_ns()}.log").open("w")
        self.worker = subprocess.Popen(self.worker_cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive_nodes() < 2:
            if self.worker.poll() is not None:
                raise ClusterError(f"worker node exited {self.worker.returncode}: {log.name}")
            time.sleep(1)
        if self.alive_nodes() != 2:
            raise ClusterError("the worker node did not join")

    def kill_worker(self, wait_dead: bool = True) -> None:
        """SIGKILL every process of the worker node's session (raylet, its workers, agents): a node lost.
        ``wait_dead``: also wait (≤ 60 s) until the GCS counts the node dead — its health check takes ~15 s here;
        a teardown has no need to."""
        if self.worker is None:
            return
        kill_session(self.worker.pid)
        self.worker.wait(timeout=10)
        if not wait_dead:
            return
        deadline = time.time() + 60
        while time.time() < deadline and self.alive_nodes() > 1:
            time.sleep(1)

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        try:
            return sum(n.state == "ALIVE" for n in list_nodes(address=self.dashboard))
        except Exception:
            return 0

    # --- tracking server --------------------------------------------------------------------------------------------
    def start_mlflow(self, timeout: float = 90) -> None:
        log = self.base / "job" / f"mlflow-{time.time_ns()}.log"
        self.mlflow = subprocess.Popen(self.mlflow_cmd, env={**self.env, "MLFLOW_BIN": str(BIN / "mlflow")},
                                       stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.started[self.mlflow.pid] = psutil.Process(self.mlflow.pid)
        wait_http(f"http://127.0.0.1:{self.mlflow_port}/health", timeout, self.mlflow, log)
        self.started.update({p.pid: p for p in self._mlflow_tree()})

    def stop_mlflow(self) -> None:
        """SIGKILL the tracking server's whole session (gunicorn/uvicorn workers included)."""
        if self.mlflow is not None and self.mlflow.poll() is None:
            kill_session(self.mlflow.pid)
            self.mlflow.wait(timeout=10)

    def restart_mlflow(self) -> None:
        """The tracking server killed and started again on the same store and port (a head pod restart)."""
        self.stop_mlflow()
        self.start_mlflow()

    def _mlflow_tree(self) -> list[psutil.Process]:
        if self.mlflow is None:
            return []
        try:
            p = psutil.Process(self.mlflow.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    # --- jobs -----------------------------------------------------------------------------------------------------
    def runtime_env(self, data: Path | None = None) -> dict[str, Any]:
        import yaml

        from etbench.storage import job_runtime_env

        env = job_runtime_env(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
        env["env_vars"].update({"ETBENCH_DATA": str(data or REPO.parent / "shared" / "data"), "DS_ACCELERATOR": "cpu"})
        return env

    def submit(self, args: list[str], *, data: Path | None = None, extra_env: dict[str, str] | None = None) -> str:
        """``ray job submit --working-dir .`` of ``python -m etbench.cli ARGS`` without waiting; the submission id
        (also in the job's metadata, which Ray hands its driver: :meth:`driver_pids` finds it by that)."""
        from ray.job_submission import JobSubmissionClient

        env = self.runtime_env(data)
        env["env_vars"].update(extra_env or {})
        sid = f"etbench-{time.time_ns()}"
        JobSubmissionClient(self.dashboard).submit_job(
            entrypoint=" ".join([sys.executable, "-m", "etbench.cli", *args]), submission_id=sid,
            metadata={"etbench_submission": sid}, runtime_env={**env, "working_dir": str(REPO)})
        return sid

    def sweep_args(self, grid: Path, *extra: str) -> list[str]:
        return ["sweep", "run", str(grid), "--address", "auto", "--tracking-uri", self.tracking_uri,
                "--storage", str(self.shared), *extra]

    def status(self, sid: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.dashboard).get_job_status(sid))

    def logs(self, sid: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard).get_job_logs(sid)

    def wait(self, sid: str, timeout: float) -> str:
        """The job's final status (it is stopped when ``timeout`` passes first)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        deadline = time.time() + timeout
        status = str(client.get_job_status(sid))
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(1)
            status = str(client.get_job_status(sid))
        if status not in TERMINAL:
            client.stop_job(sid)
        return status

    def driver_pids(self, sid: str, timeout: float = 60) -> list[int]:
        """The PIDs of a job's entrypoint (the shell Ray starts and ``python -m etbench.cli``): the processes whose
        command line names ``etbench.cli`` and whose job config (``RAY_JOB_CONFIG_JSON_ENV_VAR``) carries ``sid``."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = []
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "etbench.cli" not in " ".join(p.info["cmdline"] or []):
                        continue
                    if sid in p.environ().get("RAY_JOB_CONFIG_JSON_ENV_VAR", ""):
                        found.append(p.pid)
                except psutil.Error:
                    continue
            if found:
                return found
            time.sleep(0.5)
        raise ClusterError(f"no driver process found for job {sid}")

    def kill_driver(self, sid: str) -> None:
        """SIGKILL a job's driver (its trial actors die with it, as on a real cluster) and wait for Ray to see it."""
        for pid in self.driver_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait(sid, 60)

    # --- store ----------------------------------------------------------------------------------------------------
    def runs(self, experiment: str) -> list[Any]:
        """The experiment's trial runs (the grid's parent run left out), read from the server directly."""
        from mlflow.tracking import MlflowClient

        ml = MlflowClient(f"http://127.0.0.1:{self.mlflow_port}")
        exp = ml.get_experiment_by_name(experiment)
        runs = [] if exp is None else list(ml.search_runs([exp.experiment_id]))
        return [r for r in runs if r.data.tags.get("etbench.kind") != "grid"]

    @property
    def direct_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


@contextmanager
def loopback_cluster(*, node_cpus: int = 2, worker_slots: int = 2, proxy: bool = False,
                     prefix: str = "etbl-") -> Iterator[LoopbackCluster]:
    """Head + worker node (``node_cpus`` each; the worker also has ``worker_slots`` of :data:`WORKER_SLOT`) and an
    MLflow server, all stopped by PID on exit; the cluster folder (under ``/tmp``, short for Ray's socket paths)
    is removed. Raises ClusterError when a piece does not start."""
    why = can_run()
    if why:
        raise ClusterError(why)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}stage-", dir="/tmp"))  # where `shared` is re-bound from
    for d in ("h", "shared", "mlflow", "job", "headonly/data"):
        (base / d).mkdir(parents=True)
    (base / "headonly" / "data" / "mnist").symlink_to(REPO.parent / "shared" / "data" / "mnist")
    default_address_file = Path("/tmp/ray/ray_current_cluster")
    address_before = default_address_file.read_text() if default_address_file.exists() else None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "TQDM_DISABLE": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    gcs_port, dash_port, ml_port = free_port(), free_port(), free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    common = [f"--num-cpus={node_cpus}", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={base / 'h'}", *common]
    ray_start = " ".join([str(BIN / "ray"), "start", f"--address={gcs}", f"--node-ip-address={WORKER_IP}",
                          f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={base / 'w'}", "--block",
                          f"--resources='{json.dumps({WORKER_SLOT: worker_slots})}'", *common])
    # the worker's own disk: a tmpfs over the whole cluster folder, with only `shared` bound back in
    script = (f"set -e; mount --bind {base / 'shared'} {stage}; mount -t tmpfs tmpfs {base}; "
              f"mkdir -p {base / 'shared'} {base / 'w'}; mount --bind {stage} {base / 'shared'}; "
              f"mkdir -p /tmp/ray; mount -t tmpfs tmpfs /tmp/ray; exec {ray_start}")
    mlflow_cmd = ["bash", str(CLUSTER / "mlflow_server.sh"), "--store", str(base / "mlflow"), "--port", str(ml_port)]
    tcp = None
    if proxy:
        from etbench.testing.tcp_proxy import TcpProxy

        tcp = TcpProxy(ml_port).start()
    uri = f"http://127.0.0.1:{tcp.port}" if tcp is not None else f"http://127.0.0.1:{ml_port}"
    cl = LoopbackCluster(base, base / "shared", gcs, f"http://127.0.0.1:{dash_port}", uri, env,
                         ["unshare", "--mount", "--propagation", "private", "bash", "-c", script], mlflow_cmd,
                         ml_port, proxy=tcp)
    needles = [str(base), f"--address={gcs}"]
    try:
        cl.start_mlflow()
        r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=120)
        cl.started.update(processes_matching(needles))
        if r.returncode != 0:
            raise ClusterError(f"head failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        wait_http(f"{cl.dashboard}/api/version", 90)
        cl.start_worker()
        cl.started.update(processes_matching(needles))
        yield cl
    finally:
        try:
            if cl.worker is not None and cl.worker.poll() is None:
                cl.kill_worker(wait_dead=False)
        except Exception as e:  # whatever failed, every process below is still stopped
            print(f"loopback cluster: stopping the worker node failed ({e!r}); stopping every process by PID",
                  file=sys.stderr)
        cl.started.update(processes_matching(needles))
        cl.started.update({p.pid: p for p in cl._mlflow_tree()})
        survivors = stop_processes(cl.started)
        if cl.mlflow is not None:
            cl.mlflow.wait(timeout=5)
        if tcp is not None:
            tcp.stop()
        if default_address_file.exists() and gcs in default_address_file.read_text():
            if address_before is None:
                default_address_file.unlink()
            else:
                default_address_file.write_text(address_before)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        if survivors:
            raise ClusterError(f"processes the loopback cluster started are still alive: {survivors}")
