"""One trial lifecycle, shared by the plain grid (:mod:`etbench.sweep.runner`) and the tuned grid
(:mod:`etbench.sweep.tune_stage`): where a trial's folder is, which MLflow run it continues, how it runs inside a
Ray Tune actor, and how its outcome is recorded.

Run identity (:mod:`etbench.tracking.identity`): the trial folder's ``tracking.json`` names the trial's run. When
a sweep plans a config hash (:func:`plan_hash`), that run is the one kept live; every other RUNNING/SCHEDULED run
of the hash is closed KILLED with ``etbench.closed_reason``. A folder whose run was stopped early by a scheduler
or superseded by ``--force`` is moved aside (:func:`set_aside_stale`), never continued as a full run.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.errors import EtbenchError
from etbench.storage import Storage
from etbench.sweep.grid import Trial
from etbench.tracking.identity import close_live_runs, read_identity

LOCAL_RAY_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the external interface; other loopback addresses stay local
LIVE = ("RUNNING", "SCHEDULED", "KILLED", "FAILED")  # statuses a trial with a checkpoint may continue


class SweepError(EtbenchError, RuntimeError):
    """The sweep cannot start as asked (partial results without --resume, bad address, …)."""


@dataclass
class SweepResult:
    grid: str
    experiment: str
    tracking_uri: str
    results_dir: Path  # the POSIX storage; for a URI storage, this node's scratch copy of the trial folders
    planned: int
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    storage: str = ""
    todo: list[tuple[Trial, str | None]] = field(default_factory=list)  # (trial, MLflow run id to attach to)
    closed: list[str] = field(default_factory=list)  # runs closed KILLED while planning (second live runs)
    superseded: list[str] = field(default_factory=list)  # runs tagged superseded by --force


def trial_dir(results_dir: Path, grid: str, config_hash: str) -> Path:
    return Path(results_dir).resolve() / grid / "trials" / config_hash


def local_root(st: Storage) -> Path:
    """Where trial folders live on a node: the POSIX storage itself, or node-local scratch for a URI storage."""
    return Path(tempfile.gettempdir()) / "etbench-trials" if st.is_uri else st.local


def plan_hash(uri: str, refs: list[Any], folder: Path, *, started: bool, resume: bool) -> tuple[str | None, list[str]]:
    """For one planned config hash with MLflow runs ``refs`` (newest first): the run its trial continues, and the
    runs closed KILLED because they are live but not that run.

    The trial continues the run its folder names (``tracking.json``); an older folder without one continues the
    newest live run when resuming. Every other RUNNING/SCHEDULED run of the hash is closed with a reason."""
    ident = read_identity(folder) if started else None
    ids = {r.run_id for r in refs}
    keep = ident.run_id if ident is not None and ident.run_id in ids else None
    if keep is None and resume and started:
        live = [r for r in refs if r.status in LIVE and not r.superseded]
        keep = live[0].run_id if live else None  # newest first: the attempt that wrote the latest checkpoint
    why = (f"a second live run of config hash {refs[0].config_hash if refs else '?'}; the sweep continues "
           f"{keep}" if keep else "interrupted; its trial starts afresh in a new run")
    return keep, close_live_runs(uri, refs, keep, why)


def set_aside(path: str | Path, label: str) -> str | None:
    """Move a trial folder (path or URI) to ``<name>.<label>-<UTC time>`` beside it; the new name, or None when
    there was nothing to move. Results are moved, never deleted."""
    from etbench.storage import _fs, exists, is_uri

    if not exists(str(path)):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{str(path).rstrip('/')}.{label}-{stamp}"
    n = 1
    while exists(target):
        n += 1
        target = f"{str(path).rstrip('/')}.{label}-{stamp}-{n}"
    if is_uri(str(path)):
        fs, src = _fs(str(path))
        _, dst = _fs(target)
        fs.move(src, dst)
    else:
        os.replace(path, target)
    return target


def set_aside_stale(out: Path, uri: str, uri_folder: str | None = None) -> str | None:
    """Move ``out`` aside when its ``tracking.json`` names a run that must not be continued: one stopped early by a
    scheduler (a truncated search run) or superseded by ``--force``. Returns why, or None."""
    ident = read_identity(out)
    if ident is None or ident.uri != uri:
        return None
    from mlflow.tracking import MlflowClient

    from etbench.tracking import schema as S

    try:
        run = MlflowClient(uri).get_run(ident.run_id)
    except Exception:
        return None
    tags = run.data.tags
    if tags.get(S.TAG_SUPERSEDED) == "true":
        label = "superseded"
    elif run.info.status == "FINISHED" and tags.get(S.TAG_STOPPED_EARLY):
        label = "stopped"
    else:
        return None
    set_aside(out, label)
    if uri_folder:
        set_aside(uri_folder, label)
    return label


def payload(cfg: Any, *, run_name: str, axes: dict[str, Any], out: str | Path, uri: str, experiment: str,
            grid: str, resume: bool, run_id: str | None, sweep_fields: dict[str, Any], checkpoints: dict[str, Any],
            artifact_root: str | None, parent_run_id: str | None, ray_storage: str | None = None,
            tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The one trial payload, plain grid (:mod:`etbench.sweep.runner`) and tuned grid
    (:mod:`etbench.sweep.tune_stage`) alike: what :func:`run_trial` needs, picklable for a Tune trial actor.

    ``sweep_fields``: the prologue's part (marker, admitted, custom resources, GPU share:
    :meth:`etbench.sweep.prologue.SweepContext.trial_fields`); ``run_id``: the run an older folder that names none
    continues; ``ray_storage``: Ray Train's storage of a distributed trial on a URI storage (None: beside the
    folder); ``checkpoints``: retention, not part of the config hash; ``artifact_root``: None when the tracking
    server stores artifacts itself."""
    return {"config": cfg.model_dump(mode="json"), "config_hash": cfg.hash(), "run_name": run_name, "axes": axes,
            "out": str(out), "uri": uri, "experiment": experiment, "grid": grid, "resume": resume, "run_id": run_id,
            "ray_storage": ray_storage, "marker": None, "admitted": False, "custom": {}, "gpus_per_worker": 1.0,
            **sweep_fields, "checkpoints": checkpoints, "artifact_root": artifact_root,
            "parent_run_id": parent_run_id, "tags": tags or {}}


def run_trial(payload: dict[str, Any], on_epoch: Any = None, tune_report: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Execute one trial (inside a Tune trial actor, or directly). Diverged runs are FAILED, not retried.

    The trial's MLflow run is the one its folder names (re-attached on every retry); ``payload["run_id"]`` only
    serves an older folder that names none. The tuning stage's per-epoch reports to Tune: ``on_epoch(epoch, row)``
    is called after every epoch of a one-worker run; a distributed run forwards ``tune_report``'s metric from its
    ranks instead (:func:`etbench.engine.launch.fit`)."""
    from etbench.config import CheckpointRetention, RunConfig
    from etbench.engine.backend import DivergedError
    from etbench.engine.launch import has_started
    from etbench.engine.tracked import TrackingSpec
    from etbench.tracking.mlflow_log import find_finished

    if payload.get("marker"):  # the node this trial landed on (maybe added by the autoscaler) sees the storage
        from etbench.storage import check_marker

        check_marker(*payload["marker"])
    cfg = RunConfig.model_validate(payload["config"])
    if cfg.hash() != payload["config_hash"]:
        raise RuntimeError(f"config hash mismatch in trial payload: {cfg.hash()} != {payload['config_hash']}")
    from etbench.tracking.outage import is_server, start_wait_s, wait_for

    def finished() -> Any:  # a tracking-server outage at the trial's start waits (bounded), as opening the run does
        return find_finished(payload["uri"], payload["experiment"], cfg.hash())

    if (wait_for(finished, start_wait_s(), "looking up the trial's finished run") if is_server(payload["uri"])
            else finished()):
        return {"status": "skipped", "config_hash": cfg.hash()}
    out = Path(payload["out"])
    ray_storage = payload.get("ray_storage")
    set_aside_stale(out, payload["uri"], ray_storage.rsplit("/", 1)[0] if ray_storage else None)
    resume = has_started(cfg, out, ray_storage)  # a retry (or --resume) continues the trial's own run/checkpoint
    spec = TrackingSpec(uri=payload["uri"], experiment=payload["experiment"], grid=payload["grid"],
                        run_name=payload["run_name"], axes=payload["axes"], artifact_root=payload["artifact_root"],
                        run_id=payload.get("run_id") if resume else None, tags=payload.get("tags") or {},
                        parent_run_id=payload.get("parent_run_id"))
    keep = CheckpointRetention.model_validate(payload.get("checkpoints") or {})  # the grid's checkpoints:
    try:
        if cfg.dist.in_process:
            from etbench.engine.tracked import run_tracked

            summary = run_tracked(cfg, out, spec, resume=resume, progress=False, on_epoch=on_epoch, retention=keep)
        else:
            from etbench.engine.launch import fit

            summary = fit(cfg, out, tracking=spec, resume=resume, progress=False, storage_path=ray_storage,
                          extra_resources=payload.get("custom") or None, tune_report=tune_report, retention=keep,
                          admitted=bool(payload.get("admitted")))
    except DivergedError as e:
        return {"status": "diverged", "config_hash": cfg.hash(), "error": str(e)}
    best = {k.replace("/", "_"): v for k, v in summary.get("best", {}).items() if isinstance(v, int | float)}
    return {"status": "finished", "config_hash": cfg.hash(), **best}


#: Why a trial without an error and without a final result is not counted finished.
NOT_FINISHED = ("did not finish: the sweep was interrupted (or the trial never returned its final result); "
                "`etbench sweep run --resume` continues it from its last checkpoint, in the same MLflow run")


def record_results(grid: Any, res: Any) -> None:
    """Sort a Tune ResultGrid of ``run_trial`` trials into ``res.finished`` (the trial returned its final result)
    / ``failed`` (errors, diverged runs and trials cut short by an interrupt, with the reason) / ``skipped``
    (already FINISHED in MLflow), by config hash. A trial that Tune stopped when the sweep was interrupted has
    no error and at most per-epoch metrics: it is never counted finished."""
    for result in grid:
        h = ((result.config or {}).get("trial") or {}).get("config_hash", "?")
        m = result.metrics or {}
        if result.error is not None:
            res.failed[h] = str(result.error)
        elif m.get("status") == "diverged":
            res.failed[h] = m.get("error", "diverged")
        elif m.get("status") == "skipped":
            res.skipped.append(h)
        elif m.get("status") == "finished":
            res.finished.append(h)
        else:
            res.failed[h] = NOT_FINISHED


def init_ray(address: str | None, use_gpu: bool, state_api: bool = False) -> bool:
    """Attach to ``address`` or start a loopback-only local Ray; returns True when this call started Ray.
    ``state_api``: a local Ray also serves Ray's state API (see :func:`etbench.ray_local.init_local_ray`)."""
    import ray

    from etbench.storage import check_address, job_env_extra, worker_env_vars

    if ray.is_initialized():
        return False
    check_address(address)
    env = worker_env_vars(use_gpu)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside `ray job submit`: the job's runtime env applies …
        extra = job_env_extra(env)  # … plus what it lacks (ETBENCH_DATA, provenance, … of this driver)
        ray.init(address=address or "auto", log_to_driver=False, runtime_env={"env_vars": extra} if extra else None)
    elif address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from etbench.ray_local import init_local_ray

        init_local_ray(LOCAL_RAY_IP, env, state_api=state_api, log_to_driver=False,
                       **({} if state_api else {"include_dashboard": False}))
    return True
