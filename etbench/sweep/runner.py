"""Run a grid with Ray Tune: one trial per resolved run config, dedup by hash against MLflow, retries, resume.

Each Tune trial is a *function trainable* that runs one etbench run: in-process for a one-worker trial (no
process group), or as a Ray Train ``TorchTrainer`` with DeepSpeed workers (``etbench.engine.launch.fit``) — the
Tune × Train composition Ray 2.60 supports (a TorchTrainer is not passed to the Tuner).

Storage (``etbench.storage``): ``--storage`` / grid ``storage:`` / ``$ETBENCH_STORAGE`` (default ``./results``) is
where runs, Ray storage and checkpoints go; on a cluster of more than one node it must be shared (checked before
anything starts, then a pre-flight task on every node: the prologue every grid, tuned or not, passes,
:mod:`etbench.sweep.prologue`). Each trial reserves what its own resolved config needs
(:func:`trial_resources`); trials no node type can ever hold are refused up front (``etbench.admission``).

Resume: every trial writes its run under ``<storage>/<grid>/trials/<hash>/`` with per-epoch checkpoints and logs to
MLflow. ``--resume`` re-plans the grid, skips hashes that already have a FINISHED run, and lets each unfinished
trial continue from its checkpoint, attached to the MLflow run its folder names (``tracking.json``; the trial
lifecycle is :mod:`etbench.sweep.trial`) — so a killed sweep resumes without ever producing two FINISHED runs for
one config hash, and a Tune retry continues the same run.

The grid is one MLflow parent run (:mod:`etbench.sweep.grid_parent`): opened, or re-opened by ``--resume`` and any
re-run into the same storage, before the trials; it holds the grid file, the plan and the cost estimate; every
trial run is its child (``mlflow.parentRunId``); it ends FINISHED when every planned trial finished.

``--force`` supersedes, never destroys: every planned trial runs again in a new MLflow run; its earlier runs are
tagged ``etbench.superseded`` (kept in the store, left out of dedup, resume and reports) and its earlier folder is
moved aside to ``trials/<hash>.superseded-<UTC time>``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from etbench.storage import Storage
from etbench.sweep import grid_parent
from etbench.sweep import trial as lifecycle
from etbench.sweep.grid import GridSpec, Trial, expand, load_grid
from etbench.sweep.prologue import SweepContext, migrate_hashes, open_sweep
from etbench.sweep.resources import trial_bundle
from etbench.sweep.trial import (
    SweepError,
    SweepResult,
    init_ray,
    local_root,
    plan_hash,
    record_results,
    set_aside,
    trial_dir,
)
from etbench.sweep.trial import payload as trial_payload
from etbench.sweep.tune_stage import run_tuned
from etbench.tracking import schema as S
from etbench.tracking.identity import supersede_runs

LOCAL_RAY_IP = lifecycle.LOCAL_RAY_IP
run_trial = lifecycle.run_trial  # the shared trial lifecycle (etbench.sweep.trial), under its older address
__all__ = ["LOCAL_RAY_IP", "SweepError", "SweepResult", "init_ray", "local_root", "plan", "record_results",
           "run_sweep", "run_trial", "trial_dir", "trial_resources"]

def trial_resources(config: dict[str, Any]) -> Any:
    """The Tune trial's placement group, from the trial's own resolved ``dist`` section, its GPU share and custom
    resources (:func:`etbench.sweep.resources.trial_bundle`)."""
    from ray.tune import PlacementGroupFactory

    p = config["trial"]
    return PlacementGroupFactory([trial_bundle(p["config"].get("dist", {}), float(p.get("gpus_per_worker", 1.0)),
                                               p.get("custom", {}))])


def _runs_by_hash(uri: str, experiment: str) -> dict[str, list[Any]]:
    """Config hash → its runs (``r.info.run_id`` / ``r.info.status``); reads hash and status only."""
    from etbench.tracking.lookup import runs_by_hash

    return dict(runs_by_hash(uri, experiment))


def _trial_payload(t: Trial, spec: GridSpec, uri: str, experiment: str, st: Storage | Path, resume: bool,
                   run_id: str | None, marker: tuple[str, str] | None = None,
                   parent_run_id: str | None = None) -> dict[str, Any]:
    if not isinstance(st, Storage):
        from etbench.storage import resolve_storage

        st = resolve_storage(st)
    results_dir = local_root(st)
    sweep = {"marker": list(marker) if marker else None, "admitted": True,  # admitted once, in the driver
             "custom": dict(spec.resources.custom), "gpus_per_worker": spec.resources.gpu_share}
    return trial_payload(
        t.config, run_name=t.run_name, axes=t.axes, out=trial_dir(results_dir, spec.name, t.config_hash), uri=uri,
        experiment=experiment, grid=spec.name, resume=resume, run_id=run_id, sweep_fields=sweep,
        checkpoints=spec.checkpoints.model_dump(), parent_run_id=parent_run_id,
        # Ray Train's storage of a multi-worker trial: beside the trial folder, or under the URI storage
        ray_storage=st.join(spec.name, "trials", t.config_hash, "ray") if st.is_uri else None,
        # a tracking server stores (proxies) artifacts itself; a local store keeps them beside the results
        artifact_root=None if uri.startswith("http") or st.is_uri else str(results_dir / "artifacts"))


def _tune_trainable(config: dict[str, Any]) -> dict[str, Any]:
    dist = config["trial"]["config"].get("dist", {})
    if int(dist.get("workers", 1)) == 1:  # an in-actor run uses the CPUs its trial reserved, not the whole node
        import torch

        torch.set_num_threads(max(1, int(float(dist.get("cpus_per_worker", 1)))))
    return {**run_trial(config["trial"]), "finished_unix": time.time()}  # Tune's own stamp has 1 s resolution


def plan(grid_path: str | Path) -> tuple[GridSpec, list[Trial]]:
    spec = load_grid(grid_path)
    return spec, expand(spec, source=str(grid_path))


def run_sweep(grid_path: str | Path, *, results_dir: str | Path | None = None, storage: str | None = None,
              address: str | None = None, tracking_uri: str | None = None, resume: bool = False,
              force: bool = False, progress: bool = True, only: int | None = None) -> SweepResult:
    """Run every not-yet-FINISHED trial of the grid; ``only`` caps the number of trials run (tests, demos).

    ``storage`` (or its older name ``results_dir``) overrides the grid's ``storage:`` and ``$ETBENCH_STORAGE``.
    On a Ray cluster (``address``, inside ``ray job submit``, or Ray already initialised) the storage and tracking
    settings are checked against the number of alive nodes, every trial is admitted against what the cluster can
    hold once scaled, and a pre-flight task on every node checks the storage and the data — all before any trial.
    """
    t0 = time.perf_counter()
    spec, trials = plan(grid_path)
    if spec.tuning is not None:  # a search stage per model, then the final stage (etbench.sweep.tune_stage)
        return run_tuned(spec, storage=storage if storage is not None else results_dir, address=address,
                         tracking_uri=tracking_uri, resume=resume, force=force, progress=progress,
                         grid_file=grid_path, flag=_flag(storage, results_dir))
    with open_sweep(spec, storage=storage if storage is not None else results_dir, address=address,
                    tracking_uri=tracking_uri, use_gpu=any(t.config.dist.use_gpu for t in trials),
                    flag=_flag(storage, results_dir), progress=progress) as sweep:
        st, uri = sweep.storage, sweep.uri
        res = _plan_trials(spec, trials, st, uri, resume, force, only, progress)
        # (a local Ray is admitted against once _run_with_tune has started it)
        sweep.admit([t.config for t, _ in res.todo], progress)
        hashes = {t.config_hash for t in trials}  # a refused grid (above) opens no parent run: nothing is created
        parent = grid_parent.open_parent(
            uri=uri, experiment=res.experiment, grid=spec.name, grid_file=grid_path, root=st.root,
            artifact_root=None if uri.startswith("http") or st.is_uri else local_root(st) / "artifacts",
            files=grid_parent.plain_plan(spec, trials, str(grid_path)), progress=progress)
        grid_parent.adopt_orphans(uri, res.experiment, parent, hashes)
        with grid_parent.closing(uri, parent, res, hashes, spec.name):
            if res.todo:
                payloads = [_trial_payload(t, spec, uri, res.experiment, st, resume, rid, sweep.marker, parent)
                            for t, rid in res.todo]
                _run_with_tune(spec, payloads, st, address, res, progress, sweep)
    res.wall_s = time.perf_counter() - t0
    if progress:
        print(f"grid {spec.name}: {len(res.finished)} finished, {len(res.failed)} failed, {len(res.skipped)} skipped "
              f"in {res.wall_s:.0f} s; MLflow store {uri}, experiment {res.experiment!r}, runs under "
              f"{st.join(spec.name, 'trials') if st.is_uri else res.results_dir / spec.name / 'trials'}")
        for h, why in res.failed.items():
            print(f"  FAILED {h}: {why.splitlines()[0] if why else ''}")
    return res


def _flag(storage: str | None, results_dir: str | Path | None) -> str:
    """The CLI flag the storage came from, for messages (``--results`` is the older name of ``--storage``)."""
    return "--results" if storage is None and results_dir is not None else "--storage"


def _plan_trials(spec: GridSpec, trials: list[Trial], st: Storage, uri: str, resume: bool, force: bool,
                 only: int | None, progress: bool) -> SweepResult:
    """Which trials still need to run (dedup by config hash against MLflow); refuses partial results w/o --resume.

    Every planned hash keeps at most one live run: the one its trial folder names (:func:`plan_hash`); other
    RUNNING/SCHEDULED runs of the hash, also of hashes already FINISHED, are closed KILLED with a reason."""
    from etbench.storage import exists

    migrate_hashes(uri, spec.tracking.experiment or spec.name, progress)  # an older store's hashes, before dedup

    experiment = spec.tracking.experiment or spec.name
    results_dir = local_root(st)
    res = SweepResult(spec.name, experiment, uri, results_dir, planned=len(trials), storage=st.root)
    existing = _runs_by_hash(uri, experiment)
    todo: list[tuple[Trial, list[Any], Path, bool]] = []
    for t in trials:
        runs = existing.get(t.config_hash, [])
        d = trial_dir(results_dir, spec.name, t.config_hash)
        if not force and any(r.complete for r in runs):
            res.skipped.append(t.config_hash)
            todo.append((t, runs, d, False))
            continue
        todo.append((t, runs, d, d.exists() or (st.is_uri and exists(st.join(spec.name, "trials", t.config_hash)))))
    partial = [t.config_hash for t, _, _, started in todo if started]
    if partial and not (resume or force):
        raise SweepError(f"{len(partial)} trial(s) of {spec.name} have partial results under "
                         f"{st.join(spec.name, 'trials')} ({', '.join(partial[:5])}…); pass --resume to continue "
                         f"them or --force to restart them")
    chosen = [t.config_hash for t, _, _, _ in todo if t.config_hash not in res.skipped][:only]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for t, runs, d, started in todo:
        if t.config_hash in res.skipped:
            res.closed += plan_hash(uri, runs, d, started=False, resume=False)[1]
        elif force and t.config_hash in chosen:  # supersede, never destroy: old runs tagged, old folders kept
            res.superseded += supersede_runs(uri, runs, when)
            set_aside(d, "superseded")
            if st.is_uri:
                set_aside(st.join(spec.name, "trials", t.config_hash), "superseded")
            res.todo.append((t, None))
        elif t.config_hash in chosen:
            run_id, closed = plan_hash(uri, runs, d, started=started, resume=resume)
            res.closed += closed
            res.todo.append((t, run_id))
    if progress:
        print(f"grid {spec.name}: {len(trials)} trials planned, {len(res.skipped)} already FINISHED in "
              f"{experiment!r}, {len(res.todo)} to run (max {spec.max_concurrent_trials} concurrent); tracking {uri}; "
              f"storage {st.describe()}" + (f"; {len(res.closed)} stale live run(s) closed KILLED" if res.closed
                                            else "") + (f"; --force: {len(res.superseded)} earlier run(s) tagged "
                                                        f"{S.TAG_SUPERSEDED}, their folders moved aside to "
                                                        f"<hash>.superseded-*" if force else ""))
    return res


def _estimates(res: SweepResult) -> dict[str, float]:
    """The plan's seconds per trial to run (config hash → s), for the progress line's ETA; unknown costs left out."""
    from etbench.sweep.grid import estimate_seconds

    out = {t.config_hash: estimate_seconds(t) for t, _ in res.todo}
    return {h: s for h, s in out.items() if s == s}


def _run_with_tune(spec: GridSpec, payloads: list[dict[str, Any]], st: Storage, address: str | None,
                   res: SweepResult, progress: bool, sweep: SweepContext | None = None) -> None:
    import ray
    from ray import tune

    from etbench.sweep.progress import TrialProgress

    use_gpu = any(p["config"].get("dist", {}).get("use_gpu") for p in payloads)
    started = init_ray(address, use_gpu)
    try:
        if started:  # the local Ray this call started: admitted against now (a cluster was, in the prologue)
            from etbench.config import RunConfig

            (sweep or SweepContext(st, "", False, custom=dict(spec.resources.custom),
                                   gpu_share=spec.resources.gpu_share)).admit_local(
                [RunConfig.model_validate(p["config"]) for p in payloads])
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, trial_resources),
            param_space={"trial": tune.grid_search(payloads)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=st.ray_path(),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=[TrialProgress(len(payloads), enabled=progress, concurrency=spec.max_concurrent_trials,
                                         estimates=_estimates(res))],
                verbose=0,
            ),
        )
        record_results(tuner.fit(), res)
    finally:
        if started:
            ray.shutdown()
