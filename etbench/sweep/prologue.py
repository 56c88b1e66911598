"""The prologue every grid passes before its first trial, plain (:mod:`etbench.sweep.runner`) or tuned
(:mod:`etbench.sweep.tune_stage`): resolve the storage → on a Ray cluster, refuse per-node paths and file tracking
stores → admit every trial once, in the driver → pre-flight on every node (a marker each trial checks again).

:func:`open_sweep` builds one :class:`SweepContext` per sweep; leaving it removes the pre-flight marker and shuts
down a Ray it started. While it is open the sweep holds the grid's driver lease (:mod:`etbench.sweep.lease`: a
second driver of the same grid on the same storage waits, then refuses). Before a sweep looks up what its store
holds, :func:`migrate_hashes` re-tags runs hashed before the execution settings left the config hash.

A single machine (no ``--address``, not inside ``ray job submit``, Ray not initialised) keeps the zero-setup
defaults: a relative storage and the SQLite store under it, no pre-flight; its trials are admitted
against the local Ray once that is up (:meth:`SweepContext.admit_local`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.storage import Storage, StorageError
from etbench.sweep.lease import DriverLease
from etbench.sweep.trial import SweepError, init_ray, local_root


@dataclass
class SweepContext:
    """What the prologue settled for one sweep; every trial payload carries :meth:`trial_fields`."""

    storage: Storage
    uri: str  # the MLflow tracking URI (given, or the SQLite default under a single machine's storage)
    on_cluster: bool
    flag: str = "--storage"  # how the storage was named on the command line, for messages
    custom: dict[str, float] = field(default_factory=dict)  # the grid's resources.custom, per worker
    gpu_share: float = 1.0  # the grid's resources.gpus_per_worker (placement only)
    marker: tuple[str, str] | None = None  # the pre-flight marker (path/URI, token) while the sweep runs
    log: Path | None = None  # the library log of this grid

    def admit(self, configs: list[Any], progress: bool = False) -> None:
        """On a cluster: every run against what the cluster can hold once scaled (in the driver: a trial's node
        cannot see the autoscaler's node types), then the pre-flight on every alive node. Nothing on one machine."""
        if not self.on_cluster or not configs:
            return
        from etbench import storage as stg

        self.admit_local(configs)
        self.marker = stg.preflight(self.storage, configs)
        if progress:
            print(f"pre-flight: {stg.cluster_size()} node(s) see storage {self.storage.root} and the data")

    def admit_local(self, configs: list[Any]) -> None:
        """Every run against the Ray this process is attached to (a local one included)."""
        from etbench.admission import admit

        if configs:
            admit(configs, custom=self.custom, gpus=self.gpu_share)

    def trial_fields(self) -> dict[str, Any]:
        """The prologue's part of every trial payload: the marker to check where the trial lands, that it was
        admitted here, its custom resources and GPU share."""
        return {"marker": list(self.marker) if self.marker else None, "admitted": True,
                "custom": dict(self.custom), "gpus_per_worker": self.gpu_share}


def on_a_cluster(address: str | None) -> bool:
    """An ``--address``, inside ``ray job submit``, or a Ray this process is attached to already."""
    import ray

    from etbench.storage import job_working_dir

    return bool(address) or job_working_dir() is not None or ray.is_initialized()


def default_uri(st: Storage, flag: str) -> str:
    """The zero-setup tracking store: SQLite under a local storage (a URI storage needs a tracking server)."""
    from etbench.tracking.mlflow_log import default_tracking_uri

    if st.is_uri:
        raise StorageError(f"{flag} {st.root} is a URI: give --tracking-uri (an MLflow server, e.g. "
                           f"http://HEAD:5000 started with cluster/mlflow_server.sh); the default SQLite store needs "
                           f"a local directory")
    return default_tracking_uri(st.local)


def migrate_hashes(uri: str, experiment: str, progress: bool) -> None:
    """Re-tag the experiment's runs hashed before the execution settings left the config hash (one pass over its
    runs' params; :mod:`etbench.tracking.rehash`), so the sweep's dedup finds them instead of re-training them."""
    from etbench.tracking.rehash import RehashError, rehash

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return  # a store this sweep is about to create holds nothing to migrate
    try:
        result = rehash(uri, experiment)
    except RehashError:  # no such experiment yet
        return
    if progress and result.changed:
        print(f"grid {experiment}: {len(result.changed)} run(s) hashed before the execution settings left the config "
              f"hash re-tagged (old hash kept in tag etbench.config_hash_v1; docs/run_identity.md)")


@contextmanager
def open_sweep(spec: Any, *, storage: str | Path | None, address: str | None, tracking_uri: str | None,
               use_gpu: bool, flag: str = "--storage", posix: bool = False, progress: bool = True,
               state_api: bool = False) -> Iterator[SweepContext]:
    """Resolve the storage (``storage`` > grid ``storage:`` > ``$ETBENCH_STORAGE`` > ./results) and the tracking
    URI, and on a cluster refuse what would leave results on one node — all before anything is created in the
    storage or the store. ``posix``: the grid needs a POSIX directory (a tuned grid: Tune's search state is
    restored from it). The caller admits its trials with :meth:`SweepContext.admit` once it knows them."""
    import ray

    from etbench import storage as stg
    from etbench.logs import route_library_logs

    st = stg.resolve_storage(storage, spec.storage, cli_flag=flag)
    if posix and st.is_uri:
        raise SweepError(f"storage {st.root}: {spec.name} is a tuned grid, which needs a local or shared POSIX "
                         f"directory (Tune's search state is restored from it)")
    log = route_library_logs(local_root(st) / spec.name)  # Tune/Ray/MLflow chatter → a kept file (etbench.logs)
    if progress:
        print(f"grid {spec.name}: library logs (Ray Tune, MLflow) → {log}")
    uri = tracking_uri or spec.tracking.uri
    cluster = on_a_cluster(address)
    if not cluster:
        stg.check_address(address)
    started = init_ray(address, use_gpu, state_api=state_api) if cluster else False
    ctx: SweepContext | None = None
    try:
        if cluster:
            stg.check_cluster_storage(st, uri, stg.cluster_size(), storage_flag=flag)
        ctx = SweepContext(st, uri or default_uri(st, flag), cluster, flag, dict(spec.resources.custom),
                           spec.resources.gpu_share, log=log)
        lease = DriverLease(st, spec.name, progress=progress)  # one driver per grid (etbench.sweep.lease)
        lease.acquire()
        try:
            yield ctx
        finally:
            lease.release()
    finally:
        if ctx is not None and ctx.marker is not None:
            stg.remove(ctx.marker[0])
        if started:
            ray.shutdown()
