"""Run a grid with Ray Tune: one trial per resolved run config, dedup by hash against MLflow, retries, resume.

Each Tune trial is a *function trainable* that runs one etbench run: in-process for a one-worker trial (no
process group), or as a Ray Train ``TorchTrainer`` with DeepSpeed workers (``etbench.engine.launch.fit``) — the
Tune × Train composition Ray 2.60 supports (a TorchTrainer is not passed to the Tuner).

Resume: every trial writes its run under ``<results>/<grid>/trials/<hash>/`` with per-epoch checkpoints and logs to
MLflow. ``--resume`` re-plans the grid, skips hashes that already have a FINISHED run, and lets each unfinished
trial continue from its checkpoint, attached to its earlier MLflow run — so a killed sweep resumes without ever
producing two FINISHED runs for one config hash.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.sweep.grid import GridSpec, Trial, expand, load_grid
from etbench.tracking import schema as S

LOCAL_RAY_IP = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the external interface; other loopback addresses stay local


class SweepError(RuntimeError):
    """The sweep cannot start as asked (partial results without --resume, bad address, …)."""


@dataclass
class SweepResult:
    grid: str
    experiment: str
    tracking_uri: str
    results_dir: Path
    planned: int
    skipped: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def trial_dir(results_dir: Path, grid: str, config_hash: str) -> Path:
    return Path(results_dir).resolve() / grid / "trials" / config_hash


def _runs_by_hash(uri: str, experiment: str) -> dict[str, list[Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list[Any]] = {}
    if exp is None:
        return out
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for r in page:
            h = r.data.tags.get(S.TAG_CONFIG_HASH)
            if h:
                out.setdefault(h, []).append(r)
        token = page.token
        if not token:
            return out


def _trial_payload(t: Trial, spec: GridSpec, uri: str, experiment: str, results_dir: Path, resume: bool,
                   run_id: str | None) -> dict[str, Any]:
    return {
        "config": t.config.model_dump(mode="json"), "config_hash": t.config_hash, "run_name": t.run_name,
        "axes": t.axes, "out": str(trial_dir(results_dir, spec.name, t.config_hash)), "uri": uri,
        "experiment": experiment, "grid": spec.name, "resume": resume, "run_id": run_id,
        # a tracking server stores (proxies) artifacts itself; a local store keeps them beside the results
        "artifact_root": None if uri.startswith("http") else str(Path(results_dir).resolve() / "artifacts"),
    }


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Execute one trial (inside a Tune trial actor, or directly). Diverged runs are FAILED, not retried."""
    from etbench.config import RunConfig
    from etbench.engine.backend import DivergedError
    from etbench.engine.launch import has_started
    from etbench.engine.tracked import TrackingSpec
    from etbench.tracking.mlflow_log import find_finished

    cfg = RunConfig.model_validate(payload["config"])
    if cfg.hash() != payload["config_hash"]:
        raise RuntimeError(f"config hash mismatch in trial payload: {cfg.hash()} != {payload['config_hash']}")
    if find_finished(payload["uri"], payload["experiment"], cfg.hash()):
        return {"status": "skipped", "config_hash": cfg.hash()}
    out = Path(payload["out"])
    resume = has_started(cfg, out)  # a retry (or --resume) continues the trial's own run and checkpoint
    spec = TrackingSpec(uri=payload["uri"], experiment=payload["experiment"], grid=payload["grid"],
                        run_name=payload["run_name"], axes=payload["axes"], artifact_root=payload["artifact_root"],
                        run_id=payload.get("run_id") if resume else None)
    try:
        if cfg.dist.workers == 1 and not cfg.dist.deepspeed:
            from etbench.engine.tracked import run_tracked

            summary = run_tracked(cfg, out, spec, resume=resume, progress=False)
        else:
            from etbench.engine.launch import fit

            summary = fit(cfg, out, tracking=spec, resume=resume, progress=False)
    except DivergedError as e:
        return {"status": "diverged", "config_hash": cfg.hash(), "error": str(e)}
    best = {k.replace("/", "_"): v for k, v in summary.get("best", {}).items() if isinstance(v, int | float)}
    return {"status": "finished", "config_hash": cfg.hash(), **best}


def _tune_trainable(config: dict[str, Any]) -> dict[str, Any]:
    dist = config["trial"]["config"].get("dist", {})
    if int(dist.get("workers", 1)) == 1:  # an in-actor run uses the CPUs its trial reserved, not the whole node
        import torch

        torch.set_num_threads(max(1, int(float(dist.get("cpus_per_worker", 1)))))
    return {**run_trial(config["trial"]), "finished_unix": time.time()}  # Tune's own stamp has 1 s resolution


def init_ray(address: str | None, use_gpu: bool) -> bool:
    """Attach to ``address`` or start a loopback-only local Ray; returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    env = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "TQDM_DISABLE": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("ETBENCH_DATA", "ETBENCH_SHARED_DATA", "ETBENCH_FAULT_MARKER"):
        if k in os.environ:
            env[k] = os.environ[k]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside `ray job submit`: the job's runtime env applies
        ray.init(address=address or "auto", log_to_driver=False)
    elif address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", _node_ip_address=LOCAL_RAY_IP, include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False)
    return True


def plan(grid_path: str | Path) -> tuple[GridSpec, list[Trial]]:
    spec = load_grid(grid_path)
    return spec, expand(spec, source=str(grid_path))


def run_sweep(grid_path: str | Path, *, results_dir: str | Path = "results", address: str | None = None,
              tracking_uri: str | None = None, resume: bool = False, force: bool = False,
              progress: bool = True, only: int | None = None) -> SweepResult:
    """Run every not-yet-FINISHED trial of the grid; ``only`` caps the number of trials run (tests, demos)."""
    from etbench.tracking.mlflow_log import default_tracking_uri

    t0 = time.perf_counter()
    spec, trials = plan(grid_path)
    results_dir = Path(results_dir).resolve()
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri(results_dir)
    experiment = spec.tracking.experiment or spec.name
    res = SweepResult(spec.name, experiment, uri, results_dir, planned=len(trials))
    existing = _runs_by_hash(uri, experiment)
    todo: list[tuple[Trial, str | None]] = []
    partial = []
    for t in trials:
        runs = existing.get(t.config_hash, [])
        if not force and any(r.info.status == "FINISHED" for r in runs):
            res.skipped.append(t.config_hash)
            continue
        d = trial_dir(results_dir, spec.name, t.config_hash)
        if d.exists():
            partial.append(t.config_hash)
            if force:
                shutil.rmtree(d)
        live = [r for r in runs if r.info.status in ("RUNNING", "KILLED", "SCHEDULED")]
        run_id = live[-1].info.run_id if (resume and live and d.exists()) else None
        todo.append((t, run_id))
    if partial and not (resume or force):
        raise SweepError(f"{len(partial)} trial(s) of {spec.name} have partial results under "
                         f"{results_dir / spec.name / 'trials'} ({', '.join(partial[:5])}…); pass --resume to continue "
                         f"them or --force to restart them")
    if only is not None:
        todo = todo[:only]
    if progress:
        print(f"grid {spec.name}: {len(trials)} trials planned, {len(res.skipped)} already FINISHED in "
              f"{experiment!r}, {len(todo)} to run (max {spec.max_concurrent_trials} concurrent); tracking {uri}")
    _close_stale_runs(uri, existing, {t.config_hash for t, rid in todo if rid is None})
    if todo:
        payloads = [_trial_payload(t, spec, uri, experiment, results_dir, resume, rid) for t, rid in todo]
        _run_with_tune(spec, payloads, results_dir, address, res, progress)
    res.wall_s = time.perf_counter() - t0
    if progress:
        print(f"grid {spec.name}: {len(res.finished)} finished, {len(res.failed)} failed, {len(res.skipped)} skipped "
              f"in {res.wall_s:.0f} s; MLflow store {uri}, experiment {experiment!r}, runs under "
              f"{results_dir / spec.name / 'trials'}")
        for h, why in res.failed.items():
            print(f"  FAILED {h}: {why.splitlines()[0] if why else ''}")
    return res


def _close_stale_runs(uri: str, existing: dict[str, list[Any]], hashes: set[str]) -> None:
    """Runs left RUNNING by a killed sweep, for trials that will start afresh, are marked KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for h in hashes:
        for r in existing.get(h, []):
            if r.info.status == "RUNNING":
                client.set_tag(r.info.run_id, S.TAG_ERROR, "interrupted; superseded by a new run of the same config")
                client.set_terminated(r.info.run_id, status="KILLED")


def _run_with_tune(spec: GridSpec, payloads: list[dict[str, Any]], results_dir: Path, address: str | None,
                   res: SweepResult, progress: bool) -> None:
    import ray
    from ray import tune

    from etbench.sweep.progress import TrialProgress

    started = init_ray(address, spec.resources.use_gpu)
    try:
        r = spec.resources
        if r.workers == 1:
            resources: dict[str, float] = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
        else:  # the trial only drives a TorchTrainer whose workers reserve their own resources
            resources = {"CPU": 0.1}
        tuner = tune.Tuner(
            tune.with_resources(_tune_trainable, resources),
            param_space={"trial": tune.grid_search(payloads)},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=True),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(results_dir / "ray"),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                callbacks=[TrialProgress(len(payloads), enabled=progress)],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        for result in grid:
            cfg = (result.config or {}).get("trial", {})
            h = cfg.get("config_hash", "?")
            m = result.metrics or {}
            if result.error is not None:
                res.failed[h] = str(result.error)
            elif m.get("status") == "diverged":
                res.failed[h] = m.get("error", "diverged")
            elif m.get("status") == "skipped":
                res.skipped.append(h)
            else:
                res.finished.append(h)
    finally:
        if started:
            ray.shutdown()
