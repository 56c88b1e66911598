"""Where a sweep's results, Ray storage and checkpoints live, and the checks that every cluster node sees them.

One setting — CLI ``--storage``, grid ``storage:``, env ``ETBENCH_STORAGE`` (first one given wins), default
``./results`` — names either a POSIX directory (on a cluster: a shared mount such as NFS, EFS or Lustre) or a URI
that Ray and pyarrow understand (``s3://``, ``gs://``, ``file://``, …). A URI is kept as written (never
``Path.resolve()``-d). The runner (``etbench sweep run``) and the launcher (``etbench train``) both call this module:

- :func:`check_cluster_storage` refuses, before anything starts on a cluster of more than one alive node, a
  relative storage path, a path inside the job's working directory (Ray's per-node copy), and a ``sqlite:`` /
  ``file:`` / bare-path MLflow store; the error says what to use instead.
- :func:`preflight` writes a marker file into the storage and runs one Ray task pinned to every alive node
  (``NodeAffinitySchedulingStrategy``): the marker must be readable there with the right content, and every dataset
  the runs need must load there (same checksum on every node); a failing node is named.

Single-machine use (a local Ray this process started) keeps today's zero-setup defaults and skips both checks.
Provenance travels the same way: :func:`client_provenance` captures the git commit and dirty flag where the sweep
is submitted, and :func:`provenance_env` hands them to the workers as environment variables.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etbench.errors import EtbenchError

ENV_STORAGE = "ETBENCH_STORAGE"
ENV_GIT_COMMIT = "ETBENCH_GIT_COMMIT"
ENV_GIT_DIRTY = "ETBENCH_GIT_DIRTY"
DEFAULT_STORAGE = "results"
MARKER_DIR = ".etbench-preflight"
SHARED_HINT = ("a directory every node mounts at the same path (NFS/EFS/Lustre, e.g. --storage /mnt/shared/etbench) "
               "or a bucket URI (--storage s3://bucket/etbench)")


class StorageError(EtbenchError, ValueError):
    """The storage or tracking setting cannot work on this cluster; the message says which setting and why."""


def is_uri(value: str) -> bool:
    """``scheme://…`` (s3, gs, file, hdfs, …) as opposed to a POSIX path."""
    head, sep, _ = value.partition("://")
    return bool(sep) and head.isidentifier()


@dataclass(frozen=True)
class Storage:
    """The resolved storage root: an absolute POSIX path or a URI (no trailing slash), and how it was given."""

    root: str
    given: str  # as the user wrote it (a relative path stays visible here)
    source: str  # "--storage", "grid storage:", "$ETBENCH_STORAGE" or "default"

    @property
    def is_uri(self) -> bool:
        return is_uri(self.root)

    @property
    def local(self) -> Path:
        """The POSIX directory; a URI storage has none (callers use :meth:`join` and :func:`exists`)."""
        if self.is_uri:
            raise StorageError(f"storage {self.root} is a URI, not a local directory")
        return Path(self.root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts)])

    def ray_path(self) -> str:
        """Ray Tune/Train ``storage_path`` of the sweep."""
        return self.join("ray")

    def describe(self) -> str:
        return f"{self.root} (from {self.source}{'' if self.given == self.root else f', given as {self.given!r}'})"


def resolve_storage(cli: str | Path | None = None, grid: str | None = None,
                    default: str | Path = DEFAULT_STORAGE, cli_flag: str = "--storage") -> Storage:
    """The first of ``cli``, ``grid``, ``$ETBENCH_STORAGE`` and ``default`` that is set; paths made absolute."""
    for value, source in ((cli, cli_flag), (grid, "grid storage:"), (os.environ.get(ENV_STORAGE), f"${ENV_STORAGE}"),
                          (default, "default")):
        if value is None or str(value) == "":
            continue
        given = str(value)
        if is_uri(given):
            return Storage(given.rstrip("/"), given, source)
        return Storage(str(Path(given).expanduser().resolve()), given, source)
    raise AssertionError("unreachable: default is always set")


# --- filesystem access that works for both kinds -----------------------------------------------------------------
def _fs(target: str) -> tuple[Any, str]:
    import pyarrow.fs

    if is_uri(target):
        return pyarrow.fs.FileSystem.from_uri(target)
    return pyarrow.fs.LocalFileSystem(), str(target)


def exists(target: str | Path) -> bool:
    """Whether a file or directory exists at a POSIX path or URI."""
    import pyarrow.fs

    fs, path = _fs(str(target))
    return bool(fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound)


def write_text(target: str, text: str) -> None:
    fs, path = _fs(target)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(target: str) -> str:
    fs, path = _fs(target)
    with fs.open_input_stream(path) as f:
        return bytes(f.read()).decode()


def remove(target: str) -> None:
    fs, path = _fs(target)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


# --- which cluster are we on --------------------------------------------------------------------------------------
def alive_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` entries of the nodes that are alive now (Ray must be initialised)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def cluster_size() -> int:
    """Alive nodes now, or more when an autoscaler can add worker nodes (then the cluster is multi-node too)."""
    from etbench.admission import node_types

    alive = len(alive_nodes())
    scalable = sum(t.max_count for t in node_types() if not t.alive)
    return alive + scalable


def worker_env_vars(use_gpu: bool) -> dict[str, str]:
    """What every Ray worker must see: the data root, the storage, the submitter's git provenance, and (CPU-only
    work) DeepSpeed's CPU accelerator. A grid with any GPU run leaves the accelerator to each run's Train workers."""
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TQDM_DISABLE": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("ETBENCH_DATA", "ETBENCH_FAULT_MARKER", ENV_STORAGE,  # the limits of a trial's start (cluster/README)
              "ETBENCH_TRAIN_START_TIMEOUT_S", "ETBENCH_TRAIN_START_RETRIES",
              # how long a trial waits out a tracking-server outage (etbench.tracking.outage)
              "ETBENCH_TRACKING_CALL_TIMEOUT_S", "ETBENCH_TRACKING_RETRY_S", "ETBENCH_TRACKING_START_WAIT_S",
              "ETBENCH_TRACKING_FINAL_WAIT_S", "ETBENCH_DRIVER_LEASE_TTL_S"):
        if k in os.environ:
            env[k] = os.environ[k]
    return {**env, **client_provenance()}


def job_env_extra(env: dict[str, str]) -> dict[str, str]:
    """Inside ``ray job submit``: the variables of ``env`` the job's runtime env does not set already (Ray refuses
    a ray.init runtime env that repeats a job env key)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    return {k: v for k, v in env.items() if k not in (job.get("env_vars") or {})}


def job_working_dir() -> Path | None:
    """Inside ``ray job submit`` the driver runs in this node's unpacked copy of the working dir: that directory."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return None
    return Path.cwd().resolve()


def check_address(address: str | None) -> None:
    """Refuse Ray Client (``ray://``): the driver's own files (config.json, tracking.json, the trial folders'
    bookkeeping) would be written on the client machine while the workers write on the cluster."""
    if address and address.startswith("ray://"):
        raise StorageError(f"--address {address}: Ray Client (ray://) is not supported — the sweep driver writes "
                           f"trial folders and tracking bookkeeping where it runs, which would be the client, not "
                           f"the cluster. Submit the sweep as a job instead: ray job submit --address "
                           f"http://HEAD:8265 --working-dir . -- python -m etbench.cli sweep run GRID --address auto "
                           f"--storage /shared/path --tracking-uri http://HEAD:5000 (see cluster/README.md)")


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def is_file_store(tracking_uri: str | None) -> bool:
    """An MLflow store that lives in one node's files: sqlite, file:, a bare path (or nothing: the sqlite default)."""
    uri = tracking_uri or ""
    if not uri or uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in uri and not uri.startswith("databricks")


def check_cluster_storage(storage: Storage, tracking_uri: str | None, nodes: int, *,
                          storage_flag: str = "--storage", tracking_flag: str = "--tracking-uri",
                          tracked: bool = True) -> None:
    """On a cluster of ``nodes`` > 1 alive nodes, refuse settings that would leave results on one node's disk.

    ``tracked=False``: the run logs to no MLflow store (``etbench train`` without tracking), so only the storage
    is checked."""
    if nodes <= 1:
        return
    problems = []
    if not storage.is_uri:
        given = Path(str(storage.given)).expanduser()
        work = job_working_dir()
        if not given.is_absolute():
            problems.append(f"{storage_flag} is the relative path {storage.given!r} (from {storage.source}): on a "
                            f"cluster it names a different directory on every node; use {SHARED_HINT}")
        elif work is not None and _inside(Path(storage.root), work):
            problems.append(f"{storage_flag} {storage.root} lies inside the job's working directory {work}, which "
                            f"is a per-node copy that Ray deletes after the job; use {SHARED_HINT}")
    if tracked and is_file_store(tracking_uri):
        problems.append(f"{tracking_flag} {tracking_uri or '(default: sqlite under the storage)'} is a file store: "
                        f"every node "
                        f"would write its own copy (or corrupt one SQLite file over NFS); start an MLflow server "
                        f"(cluster/mlflow_server.sh) and pass {tracking_flag} http://HEAD:5000")
    if problems:
        raise StorageError(f"this Ray cluster has {nodes} alive nodes, which share no disk unless told so:\n  - "
                           + "\n  - ".join(problems))


# --- the pre-flight -----------------------------------------------------------------------------------------------
def dataset_refs(configs: list[Any]) -> list[dict[str, Any]]:
    """The distinct datasets (loader arguments only) that these run configs load; synthetic/bundled ones included."""
    refs: dict[str, dict[str, Any]] = {}
    for cfg in configs:
        t = cfg.task
        if t.kind == "image":
            ref = {"kind": "image", "dataset": t.dataset, "root": t.root, "image_size": t.image_size}
        else:
            ref = {"kind": "graph", "dataset": t.dataset, "path": t.path}
        refs[repr(sorted(ref.items()))] = ref
    return list(refs.values())


def probe_dataset(ref: dict[str, Any]) -> str:
    """Load one dataset exactly as a trial would (same loader, same path resolution); returns its checksum."""
    from etbench.data.paths import resolve_data_path

    if ref["kind"] == "image":
        from etbench.data.images import load_image_dataset

        splits = load_image_dataset(ref["dataset"], resolve_data_path(ref.get("root")), limit_train=1, limit_eval=1,
                                    image_size=ref.get("image_size") or 224)
        return str(splits.checksum)
    if ref["dataset"] == "synthetic":
        return "generated"
    from etbench.data.graphs import load_graph_dataset

    return str(load_graph_dataset(ref["dataset"], resolve_data_path(ref.get("path"))).checksum)


def _ref_name(ref: dict[str, Any]) -> str:
    where = ref.get("root") or ref.get("path")
    return f"{ref['kind']} dataset {ref['dataset']!r}" + (f" ({where})" if where else "")


def node_check(marker: str, token: str, refs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs on one node: is the driver's marker visible with its content, and does every dataset load here?"""
    import socket

    import ray

    report: dict[str, Any] = {"node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                              "problems": [], "checksums": {}}
    try:
        seen = read_text(marker)
        if seen.strip() != token:
            report["problems"].append(f"the storage marker {marker} holds {seen.strip()[:40]!r}, not this sweep's "
                                      f"token: the node mounts a different directory at that path")
    except (OSError, ValueError) as e:
        report["problems"].append(f"the storage marker {marker} the driver wrote is not visible here "
                                  f"({type(e).__name__}: {e}); this node does not mount the shared storage")
    from etbench.data.paths import data_root

    root = data_root(check=False)
    for ref in refs:
        try:
            report["checksums"][_ref_name(ref)] = probe_dataset(ref)
        except Exception as e:  # a missing/corrupt file in any loader: reported with the node, never raised here
            report["problems"].append(f"{_ref_name(ref)} does not load here "
                                      f"(data root {root}, from $ETBENCH_DATA or its default): "
                                      f"{type(e).__name__}: {str(e)[:300]}")
    return report


def preflight(storage: Storage, configs: list[Any], *, timeout_s: float = 180.0) -> tuple[str, str]:
    """Check every alive node sees ``storage`` and the datasets of ``configs``; raises StorageError naming nodes.

    Returns the marker (path/URI, token), which stays in the storage while the sweep runs: nodes that join later
    (autoscaling) are not covered here, so every trial checks the marker again where it starts
    (:func:`check_marker`); the caller removes it at the end.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker, token = write_marker(storage)
    refs = dataset_refs(configs)
    nodes = alive_nodes()
    task = ray.remote(node_check)
    pending = {n["NodeID"]: task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=n["NodeID"], soft=False)).remote(marker, token, refs) for n in nodes}
    # every node's check in parallel under one deadline; a check still running then is cancelled, not left behind
    _, late_refs = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
    late = set(late_refs)
    for ref in late:
        ray.cancel(ref, force=True)
    reports, problems = [], []
    for n in nodes:
        name = f"node {n.get('NodeManagerAddress')} ({n['NodeID'][:12]})"
        if pending[n["NodeID"]] in late:
            problems.append(f"{name}: the pre-flight check did not finish within {timeout_s:.0f} s (cancelled): "
                            f"the storage or a dataset is slow or hangs there")
            continue
        try:
            rep = ray.get(pending[n["NodeID"]])
        except Exception as e:  # the task could not run there at all
            problems.append(f"{name}: the pre-flight task failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        reports.append(rep)
        problems += [f"{name}: {p}" for p in rep["problems"]]
    by_dataset: dict[str, set[str]] = {}
    for rep in reports:
        for ds, checksum in rep["checksums"].items():
            by_dataset.setdefault(ds, set()).add(checksum)
    problems += [f"{ds} differs between nodes (checksums {sorted(c[:12] for c in sums)}); stage one copy on the "
                 f"shared storage" for ds, sums in by_dataset.items() if len(sums) > 1]
    if problems:
        remove(marker)
        raise StorageError(f"cluster pre-flight failed for storage {storage.describe()} on {len(nodes)} node(s):\n  - "
                           + "\n  - ".join(problems))
    return marker, token


def write_marker(storage: Storage) -> tuple[str, str]:
    """Write a fresh marker file into the storage; returns (its path/URI, the token it holds)."""
    token = uuid.uuid4().hex
    marker = storage.join(MARKER_DIR, f"{token}.txt")
    write_text(marker, token + "\n")
    return marker, token


def check_marker(marker: str, token: str) -> None:
    """A trial's own check (on whatever node it landed, e.g. one the autoscaler added after the pre-flight)."""
    try:
        ok = read_text(marker).strip() == token
    except (OSError, ValueError):
        ok = False
    if not ok:
        import socket

        raise StorageError(f"node {socket.gethostname()}: the sweep's storage marker {marker} is not visible here; "
                           f"this node does not mount the shared storage")


# --- provenance ---------------------------------------------------------------------------------------------------
def client_provenance() -> dict[str, str]:
    """Git commit and dirty flag of the checkout this process runs from (or what its submitter passed on)."""
    from etbench.tracking.mlflow_log import git_commit, git_dirty

    commit = git_commit()
    return {} if commit == "unknown" else {ENV_GIT_COMMIT: commit, ENV_GIT_DIRTY: git_dirty()}


def job_runtime_env(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (e.g. cluster/runtime_env.yaml) with the submitter's provenance added to its ``env_vars``."""
    env = dict(base or {})
    env["env_vars"] = {**(env.get("env_vars") or {}), **client_provenance()}
    return env


def main(argv: list[str] | None = None) -> int:
    """``python -m etbench.storage runtime-env [BASE.yaml]``: the JSON for ``ray job submit --runtime-env-json``."""
    import argparse
    import json

    import yaml

    p = argparse.ArgumentParser(prog="python -m etbench.storage")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("runtime-env", help="runtime env JSON carrying this checkout's git commit and dirty flag")
    r.add_argument("base", nargs="?", help="a runtime_env YAML to extend (e.g. cluster/runtime_env.yaml)")
    a = p.parse_args(argv)
    base = yaml.safe_load(Path(a.base).read_text()) if a.base else {}
    print(json.dumps(job_runtime_env(base)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
