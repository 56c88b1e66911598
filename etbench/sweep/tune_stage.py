"""Run a tuned grid (:mod:`etbench.sweep.tuning`) on Ray Tune: one search per group, then the final runs.

Stage 1, per group (a model at one axis combination): a ``tune.Tuner`` whose searcher (Tune's random
``BasicVariantGenerator`` or ``OptunaSearch``, both seeded) draws the group's budget of configurations. Each trial
is one tracked etbench run (tag ``etbench.stage = tune``) that reports its validation metric to Tune after every
epoch; ASHA stops poor ones early. A stopped run is closed by the driver from the epochs MLflow holds
(:mod:`etbench.sweep.tune_runs`; status FINISHED, tag ``etbench.stopped_early``); a diverged one is FAILED with its
reason and still counts as one configuration.

Stage 2: each group's FINISHED tuning run with the best validation metric (read back from MLflow) is re-run over
the grid's seeds (× splits) with tags ``etbench.stage = final`` and ``etbench.tuned_from = <tuning run id>`` —
unless the group's search evaluated more configurations than its budget (refused).

Before anything runs, a tuned grid passes the prologue every grid passes (:mod:`etbench.sweep.prologue`): on a
cluster its storage and tracking store are checked, every search and final configuration is admitted once in the
driver, and every node is pre-flighted; each trial checks the sweep's marker where it lands.

Resume: every search keeps Tune's experiment state (trials + searcher state, saved every second) under
``<storage>/<grid>/tune/<group>/``; ``--resume`` restores it with ``Tuner.restore``, so the search continues where
it stopped; a configuration whose config hash already has a FINISHED run is reported from MLflow, never trained
again, and an interrupted one continues from its checkpoint in its own MLflow run. Then the final stage runs,
deduplicated by config hash like any grid.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from etbench.sweep import grid_parent
from etbench.sweep import tuning as T
from etbench.sweep.grid import GridSpec
from etbench.sweep.prologue import SweepContext, migrate_hashes, open_sweep
from etbench.sweep.resources import trial_bundle
from etbench.sweep.trial import SweepError, SweepResult, init_ray, plan_hash, record_results, run_trial
from etbench.sweep.trial import payload as trial_payload
from etbench.sweep.tune_runs import _client, _close_orphans, _close_stopped_run, select
from etbench.tracking import schema as S
from etbench.tracking.lookup import run_refs

SEARCH_DONE = "search_done.json"


@dataclass
class TunedResult(SweepResult):
    """A sweep result plus, per group, the selected tuning run and how many configurations were evaluated."""

    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluated: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, int | None] = field(default_factory=dict)  # config hash → epochs recorded when cut short
    # (None: the scheduler stopped it, but only after its last epoch — a full run, not tagged stopped_early)


# --- inside the Tune trial actor --------------------------------------------------------------------------------
def _payload(ctx: dict[str, Any], cfg: Any, run_name: str, axes: dict[str, Any], tags: dict[str, str],
             run_id: str | None, sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """One tuned trial's payload. ``sweep``: the prologue's fields of *this* sweep (marker, admitted, custom
    resources, GPU share: :meth:`etbench.sweep.prologue.SweepContext.trial_fields`) — never taken from ``ctx``,
    which a restored search brings back from the sweep that started it."""
    return trial_payload(cfg, run_name=run_name, axes=axes, out=Path(ctx["trials"]) / cfg.hash(), uri=ctx["uri"],
                         experiment=ctx["experiment"], grid=ctx["grid"], resume=True, run_id=run_id,
                         sweep_fields=sweep or {}, artifact_root=ctx["artifact_root"], parent_run_id=_parent(ctx),
                         checkpoints=ctx.get("checkpoints") or {},  # absent in a search stored before retention
                         tags=tags)


def _parent(ctx: dict[str, Any]) -> str | None:
    """The grid's parent run, read from the results folder's ``grid_run.json`` (which the driver writes before any
    trial): a restored search's stored ``ctx`` may come from a sweep before the parent existed."""
    try:
        d = json.loads((Path(ctx["trials"]).parent / S.GRID_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(d, dict) and d.get("uri") == ctx["uri"] and d.get("experiment") == ctx["experiment"]
    return d.get("run_id") if same else None


def _complete_runs(ctx: dict[str, Any], config_hash: str) -> list[Any]:
    """FINISHED runs of the hash that stand for it: never one stopped early by ASHA or superseded."""
    refs = run_refs(ctx["uri"], ctx["experiment"], config_hash=config_hash, status="FINISHED")
    return [r for r in refs if r.complete]


def _attach_or_close(ctx: dict[str, Any], config_hash: str) -> str | None:
    """The MLflow run an interrupted trial continues (the one its folder names, :func:`plan_hash`); every other
    live run of the hash is closed KILLED with a reason."""
    folder = Path(ctx["trials"]) / config_hash
    refs = run_refs(ctx["uri"], ctx["experiment"], config_hash=config_hash)
    return plan_hash(ctx["uri"], refs, folder, started=folder.exists(), resume=True)[0]


def _threads(ctx: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(max(1, int(float(ctx.get("threads", 1)))))


def tune_tags(ctx: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """The MLflow tags of one tuning run: stage, group, searched params, metric and the grid's search seed (absent
    only in a search started before the tag existed and restored since: its stored ``ctx`` lacks the seed)."""
    tags = {S.TAG_STAGE: S.STAGE_TUNE, S.TAG_TUNE_GROUP: ctx["gid"], S.TAG_TUNE_PARAMS: T.params_json(params),
            S.TAG_TUNE_METRIC: f"{ctx['metric']}:{ctx['mode']}"}
    if ctx.get("search_seed") is not None:
        tags[S.TAG_TUNE_SEARCH_SEED] = str(ctx["search_seed"])
    if ctx.get("space"):  # absent in a search started before the tag existed and restored since
        tags[S.TAG_TUNE_SPACE] = ctx["space"]
    return tags


def search_trial(config: dict[str, Any], sweep: dict[str, Any] | None = None) -> None:
    """One tuning trial: resolve the sampled configuration, run (or recall) it, report every epoch to Tune.
    ``sweep``: this sweep's prologue fields, passed with ``tune.with_parameters`` (fresh on a restored search)."""
    from ray import tune

    from etbench.engine.loop import StopRequested

    ctx, params = config["ctx"], dict(config["params"])
    _threads(ctx)
    cfg = T.config_from(ctx["over"], params)
    h, key, last = cfg.hash(), T.metric_key(ctx["metric"]), cfg.train.epochs
    done = _complete_runs(ctx, h)
    if done:  # evaluated before (an earlier, interrupted driver): report its result, never train it again
        value = _client(ctx["uri"]).get_run(done[0].run_id).data.metrics.get(f"best/{ctx['metric']}")
        tune.report({"status": "skipped", "epoch": last, "config_hash": h,
                     **({key: value} if value is not None else {})})
        return

    def report(epoch: int, row: dict[str, float]) -> None:
        value = row.get(ctx["metric"])
        if epoch + 1 >= last or value is None or not math.isfinite(value):
            return  # the last epoch is reported with the outcome below (ASHA stops any trial at max_t)
        try:
            tune.report({"epoch": epoch + 1, key: float(value), "config_hash": h})
        except SystemExit:  # the scheduler stopped this trial while it waited in report
            raise StopRequested(epoch + 1) from None

    tags = tune_tags(ctx, params)
    short = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())
    payload = _payload(ctx, cfg, f"tune {ctx['gid']} {short}", ctx["axes"], tags,
                       _attach_or_close(ctx, h), sweep)
    outcome = run_trial(payload, on_epoch=report,
                        tune_report={"metric": ctx["metric"], "key": key, "config_hash": h})
    final: dict[str, Any] = {"status": outcome["status"], "epoch": last, "config_hash": h}
    if outcome["status"] == "finished" and isinstance(outcome.get(key), int | float):
        final[key] = float(outcome[key])
    if outcome["status"] == "diverged":
        final["error"] = str(outcome.get("error", ""))[:500]
    tune.report(final)  # ASHA stops every trial at max_t: Tune ends this thread here with SystemExit(0) — let it
    # propagate (swallowing it makes Tune's wrapper report once more and block, so a reused actor never frees)


def final_trial(config: dict[str, Any]) -> None:
    """One final-stage run (no per-epoch reports: nothing is stopped early)."""
    from ray import tune

    p = config["trial"]
    _threads(p)
    tune.report({**run_trial(p), "finished_unix": time.time()})


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --- on the driver ----------------------------------------------------------------------------------------------
def _resources(spec: GridSpec) -> dict[str, float]:
    """A tuned trial's bundle, by the plain grid's rule (:func:`etbench.sweep.resources.trial_bundle`): an
    in-actor run reserves its worker's CPUs, GPU share and custom resources; a trial that drives a TorchTrainer
    asks for a sliver of CPU (its workers reserve their own, the custom resources included)."""
    r = spec.resources
    dist = {"workers": r.workers, "cpus_per_worker": r.cpus_per_worker, "use_gpu": r.use_gpu,
            "deepspeed": bool((spec.base.get("dist") or {}).get("deepspeed"))}
    return trial_bundle(dist, r.gpu_share, dict(r.custom))


def _in_actor(spec: GridSpec) -> bool:
    """One-worker trials train in their Tune actor, which is reused; a distributed trial's actor drives a Ray Train
    controller and is replaced, so that a stopped trial's controller and workers end with it."""
    return spec.resources.workers == 1 and not (spec.base.get("dist") or {}).get("deepspeed")


def _searcher(spec: GridSpec, g: T.Group, conc: int) -> Any:
    seed = T.group_seed(spec.tuning.search_seed, g.gid)  # type: ignore[union-attr]
    if spec.tuning.algorithm == "optuna":  # type: ignore[union-attr]
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=conc)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=conc)


def _scheduler(spec: GridSpec, g: T.Group) -> Any:
    sch = spec.tuning.scheduler  # type: ignore[union-attr]
    if sch.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=g.budget.epochs, grace_period=sch.grace_period,
                         reduction_factor=sch.reduction_factor)


class _SearchProgress:
    """Prints one line per ended tuning trial (built lazily: ``ray.tune.Callback`` is imported on use)."""

    @staticmethod
    def make(gid: str, total: int, enabled: bool) -> Any:
        from ray.tune import Callback

        class Lines(Callback):
            done = 0

            def _line(self, trial: Any, why: str) -> None:
                Lines.done += 1
                if enabled:
                    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.config.get("params", {}).items())
                    print(f"  [{gid} {Lines.done}/{total}] {why} {params}", flush=True)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                r = trial.last_result or {}
                shown = {k: round(v, 4) for k, v in r.items() if k.startswith("val_") and isinstance(v, float)}
                status = r.get("status") or f"stopped early at epoch {r.get('epoch')}"
                self._line(trial, f"{status} {' '.join(f'{k}={v}' for k, v in shown.items())}")

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self._line(trial, "FAILED (crashed)")

        return Lines()


def run_search(spec: GridSpec, g: T.Group, ctx: dict[str, Any], root: Path, res: TunedResult,
               progress: bool, sweep: dict[str, Any] | None = None) -> None:
    """Stage 1 for one group: a new or restored Tune search of ``g.budget.configurations`` configurations.
    ``sweep``: this sweep's prologue fields for every trial payload, handed to the trials with
    ``tune.with_parameters`` so that a restored search gets this sweep's marker, not the stored one."""
    from ray import tune

    path = root / spec.name / "tune" / g.gid
    if (path / SEARCH_DONE).exists():
        res.evaluated[g.gid] = json.loads((path / SEARCH_DONE).read_text())["evaluated"]
        return
    trainable = tune.with_resources(tune.with_parameters(search_trial, sweep=sweep or {}), _resources(spec))
    grid = open_tuner(spec, g, ctx, path, trainable, progress).fit()
    seen: set[str] = set()
    interrupted = 0
    for result, tune_status in zip(grid, trial_statuses(grid), strict=True):
        m = result.metrics or {}
        cfg = result.config or {}
        h = m.get("config_hash") or T.config_from(ctx["over"], dict(cfg.get("params", {}))).hash()
        seen.add(h)
        outcome = search_outcome(m, result.error, tune_status)
        if outcome == "crashed":
            res.failed[h] = f"tuning trial crashed: {result.error}"
        elif outcome == "diverged":
            res.failed[h] = m.get("error", "diverged")
        elif outcome == "interrupted":  # left RUNNING in MLflow for --resume; the search is not done
            res.failed[h] = SEARCH_INTERRUPTED
            interrupted += 1
        elif outcome == "stopped":
            res.stopped[h] = _close_stopped_run(ctx, h, g.budget.epochs, _reported_rows(result, g.metric))
            res.finished.append(h)
        elif outcome == "skipped":
            res.skipped.append(h)
        else:
            res.finished.append(h)
    _close_orphans(ctx, seen)
    res.evaluated[g.gid] = len(grid) - interrupted
    if not interrupted and len(grid) != g.budget.configurations:  # e.g. a restore Tune could not resume
        raise SweepError(f"search {g.gid}: Tune ended the search with {len(grid)} of {g.budget.configurations} "
                         f"configurations (state in {path}); the search is not marked done. Move that folder aside "
                         "and run again with --resume: FINISHED tuning runs are reused, not retrained.")
    if not interrupted:
        (path / SEARCH_DONE).write_text(json.dumps({"evaluated": len(grid), "finished_unix": time.time()}))


def open_tuner(spec: GridSpec, g: T.Group, ctx: dict[str, Any], path: Path, trainable: Any, progress: bool) -> Any:
    """The group's Tune search: restored from ``path`` when Tune saved its experiment state there, else a new one.

    Tune writes ``tuner.pkl`` when the Tuner is built and its experiment state only once the search runs, so a driver
    killed in between leaves a folder that ``Tuner.can_restore`` accepts but ``Tuner.restore`` cannot resume. Tune
    2.x then quietly runs a fresh search from what the restore was given — one sample, and no param space unless
    passed (it is not stored): every trial got a config without its ``ctx`` (the killed-search flake of issue 23).
    No trial ran in such a search, so it is started anew here; a restore is still handed the group's param space."""
    from ray import tune

    t = spec.tuning
    assert t is not None
    space = {"ctx": ctx, "params": {k: d.to_tune() for k, d in g.dims.items()}}
    if tune.Tuner.can_restore(str(path)) and any(path.glob("experiment_state-*.json")):
        if progress:
            print(f"search {g.gid}: restoring Tune's search state from {path}")
        kw = {"resume_unfinished": True, "resume_errored": False, "restart_errored": False}
        try:
            return tune.Tuner.restore(str(path), trainable, param_space=space, **kw)
        except ValueError:  # a search stored by an older etbench, whose ctx had other keys: Tune refuses the new
            # space; its state is there, so the stored space is not needed (run_search checks the count after)
            return tune.Tuner.restore(str(path), trainable, **kw)
    conc = t.max_concurrent_trials or spec.max_concurrent_trials
    # the searcher caps the concurrency (TuneConfig's max_concurrent_trials would wrap it once more)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=T.metric_key(g.metric), mode=g.mode, search_alg=_searcher(spec, g, conc),
                                    scheduler=_scheduler(spec, g), num_samples=g.budget.configurations,
                                    reuse_actors=_in_actor(spec)),  # a stopped trial's thread ends at the reset
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  # the search state Tuner.restore reads lags its trials by at most 10 s
                                  sync_config=tune.SyncConfig(sync_period=10),
                                  callbacks=[_SearchProgress.make(g.gid, g.budget.configurations, progress)]),
    )


SEARCH_INTERRUPTED = ("did not finish: the search was interrupted before this configuration ended (not stopped by "
                      "the scheduler); `etbench sweep run --resume` restores the search and continues it")


def _reported_rows(result: Any, metric: str) -> list[dict[str, float]]:
    """The per-epoch values of ``metric`` a trial reported to Tune (epochs 1..k, or none): what the scheduler judged
    it on, for a stopped run whose epochs never reached MLflow or its folder (a distributed trial stopped right
    after its ranks' report, before rank 0 wrote them)."""
    import math

    df = getattr(result, "metrics_dataframe", None)
    key = T.metric_key(metric)
    if df is None or key not in df or "epoch" not in df:
        return []
    by_epoch = {int(e): float(v) for e, v in zip(df["epoch"], df[key], strict=True)
                if isinstance(v, int | float) and math.isfinite(v) and isinstance(e, int | float) and math.isfinite(e)}
    epochs = sorted(by_epoch)
    return [{metric: by_epoch[e]} for e in epochs] if epochs == list(range(1, len(epochs) + 1)) else []


def trial_statuses(grid: Any) -> list[str]:
    """Tune's status of each trial of a ``ResultGrid``, in the grid's order: TERMINATED (ended, or stopped by the
    scheduler), ERROR, or PENDING / RUNNING / PAUSED when the search was interrupted first. Ray 2.x keeps it only on
    the grid's ExperimentAnalysis (its ``Result`` has no status), which this reads."""
    trials = grid._experiment_analysis.trials
    if len(trials) != len(grid):
        raise SweepError(f"Ray Tune's result grid has {len(grid)} results but {len(trials)} trials")
    return [str(t.status) for t in trials]


def search_outcome(metrics: dict[str, Any], error: object, tune_status: str) -> str:
    """What became of one search trial: crashed | diverged | skipped | finished | stopped (the scheduler ended it
    between epochs: its last report has no status, Tune says TERMINATED) | interrupted (no final report and Tune
    never ended it: the driver stopped — never to be closed as a complete run)."""
    if error is not None:
        return "crashed"
    status = metrics.get("status")
    if status in ("diverged", "skipped"):
        return str(status)
    if status is not None:
        return "finished"
    return "stopped" if tune_status == "TERMINATED" else "interrupted"


def run_tuned(spec: GridSpec, *, storage: str | Path | None = None, address: str | None = None,
              tracking_uri: str | None = None, resume: bool = False, force: bool = False,
              progress: bool = True, grid_file: str | Path | None = None, flag: str = "--storage") -> TunedResult:
    """Both stages of a tuned grid; see the module docstring. Tune's settings for the search (searcher and trial
    state saved every second; no strict metric check, since diverged and stopped trials report no metric) hold for
    this call only: a later sweep in the same process gets Tune's defaults. ``grid_file``: the grid's file, recorded
in the grid's parent run (:mod:`etbench.sweep.grid_parent`; without it the trials run without a parent).
    ``flag``: the CLI flag that named ``storage``, for messages."""
    env = {"TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "1"),
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    with mock.patch.dict(os.environ, env):
        return _run_tuned(spec, storage=storage, address=address, tracking_uri=tracking_uri, resume=resume,
                          force=force, progress=progress, grid_file=grid_file, flag=flag)


def admission_configs(spec: GridSpec, gs: list[T.Group]) -> list[Any]:
    """The configurations a tuned grid admits and pre-flights: each group's base tuning config and its final
    configs (every seed and split), before any searched value is set (a search space varies hyperparameters, not
    the placement or the data)."""
    out = []
    for g in gs:
        out.append(T.tuning_config(spec, g, {}))
        out += [cfg for _, _, cfg in T.final_configs(spec, g, {})]
    return out


def _run_tuned(spec: GridSpec, *, storage: str | Path | None, address: str | None, tracking_uri: str | None,
               resume: bool, force: bool, progress: bool, grid_file: str | Path | None, flag: str) -> TunedResult:
    t0 = time.perf_counter()
    if force:
        raise SweepError(f"{spec.name}: --force is not supported for a tuned grid (it would discard the search); "
                         f"use another tracking.experiment or storage to start over")
    with open_sweep(spec, storage=storage, address=address, tracking_uri=tracking_uri, use_gpu=spec.resources.use_gpu,
                    flag=flag, posix=True, progress=progress, state_api=not _in_actor(spec)) as sweep:
        root, uri = sweep.storage.local, sweep.uri
        experiment = spec.tracking.experiment or spec.name
        gs = T.groups(spec)
        finals_per_group = len(spec.seeds) * len(spec.splits or [None])
        res = TunedResult(grid=spec.name, experiment=experiment, tracking_uri=uri, results_dir=root,
                          planned=sum(g.budget.configurations for g in gs) + finals_per_group * len(gs),
                          storage=sweep.storage.root)
        started_dir = root / spec.name / "tune"
        if started_dir.exists() and not resume:
            raise SweepError(f"{spec.name} has a search in progress or done under {started_dir}; pass --resume to "
                             f"continue it (and run the final stage)")
        configs = admission_configs(spec, gs)
        sweep.admit(configs, progress)  # a cluster: admission in the driver and the pre-flight, before any run
        from etbench.tracking.mlflow_log import ensure_experiment

        # the driver creates the store and experiment: concurrent trials must not both create the SQLite tables
        ensure_experiment(_client(uri), experiment, None if uri.startswith("http") else root / "artifacts")
        parent = None if grid_file is None else grid_parent.open_parent(
            uri=uri, experiment=experiment, grid=spec.name, grid_file=grid_file, root=str(root),
            artifact_root=None if uri.startswith("http") else root / "artifacts",
            files=grid_parent.tuned_plan(spec, str(grid_file)), progress=progress)
        with grid_parent.closing(uri, parent, res, None, spec.name):
            _stages(spec, gs, res, sweep, experiment, address, finals_per_group, progress, configs)
    res.wall_s = time.perf_counter() - t0
    if progress:
        print(f"grid {spec.name}: tuned {sum(res.evaluated.values())} configurations in {len(gs)} searches, "
              f"{len(res.finished)} runs finished, {len(res.failed)} failed, {len(res.skipped)} skipped in "
              f"{res.wall_s:.0f} s; MLflow {uri}, experiment {experiment!r}")
    return res


def _stages(spec: GridSpec, gs: list[T.Group], res: TunedResult, sweep: SweepContext, experiment: str,
            address: str | None, finals_per_group: int, progress: bool, configs: list[Any]) -> None:
    """Stage 1 (a search per group, then its selection) and stage 2 (the final runs) on Ray Tune."""
    import ray
    from ray import tune

    root, uri = sweep.storage.local, sweep.uri
    migrate_hashes(uri, experiment, progress)  # an older store's hashes, before any dedup lookup
    trials_root = root / spec.name / "trials"
    started = init_ray(address, spec.resources.use_gpu, state_api=not _in_actor(spec))  # stopped Train trials
    try:
        if started:  # the local Ray this call started (a cluster was admitted against in the prologue)
            sweep.admit_local(configs)
        for g in gs:
            ctx = {"over": T.tuning_overrides(spec, g), "gid": g.gid, "axes": g.axes, "metric": g.metric,
                   "mode": g.mode, "search_seed": spec.tuning.search_seed,  # type: ignore[union-attr]
                   "space": T.space_json(g.dims),
                   "uri": uri, "experiment": experiment, "grid": spec.name,
                   "trials": str(trials_root), "threads": spec.resources.cpus_per_worker,
                   "checkpoints": spec.checkpoints.model_dump(),
                   "artifact_root": None if uri.startswith("http") else str(root / "artifacts")}
            if progress:
                print(f"stage tune: {g.gid} ({g.model} {g.axes}) — {g.budget.configurations} configurations × "
                      f"{g.budget.epochs} epochs, {spec.tuning.algorithm} search, metric {g.metric} "  # type: ignore[union-attr]
                      f"({g.mode})", flush=True)
            run_search(spec, g, ctx, root, res, progress, sweep.trial_fields())
            best = select(uri, experiment, g, spec.name)
            if best is None:
                res.failed[g.gid] = "no tuning configuration finished; nothing to re-run"
                continue
            res.selected[g.gid] = best
            if progress:
                print(f"  selected {g.gid}: {best['params']} ({g.metric} = {best['value']:.5g}, run "
                      f"{best['run_id']})", flush=True)
        payloads = _final_payloads(spec, gs, res, uri, experiment, trials_root, root, sweep.trial_fields())
        if payloads:
            if progress:
                print(f"stage final: {len(payloads)} runs ({finals_per_group} per model and axis combination)")
            conc = spec.tuning.max_concurrent_trials or spec.max_concurrent_trials  # type: ignore[union-attr]
            tuner = tune.Tuner(
                tune.with_resources(final_trial, _resources(spec)),
                param_space={"trial": tune.grid_search(payloads)},
                tune_config=tune.TuneConfig(max_concurrent_trials=conc, reuse_actors=True),
                run_config=tune.RunConfig(name=f"final-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=str(root / spec.name / "final"), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
            )
            record_results(tuner.fit(), res)
    finally:
        if started:
            ray.shutdown()


def _final_payloads(spec: GridSpec, gs: list[T.Group], res: TunedResult, uri: str, experiment: str,
                    trials_root: Path, root: Path, sweep: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Final runs still to do (a config hash with a FINISHED run is skipped; an interrupted one is continued).
    ``sweep``: the prologue's payload fields (:meth:`etbench.sweep.prologue.SweepContext.trial_fields`)."""
    out = []
    for g in gs:
        best = res.selected.get(g.gid)
        if best is None:
            continue
        ctx = {"uri": uri, "experiment": experiment, "grid": spec.name, "trials": str(trials_root),
               "artifact_root": None if uri.startswith("http") else str(root / "artifacts"),
               "threads": spec.resources.cpus_per_worker, "checkpoints": spec.checkpoints.model_dump()}
        tags = {S.TAG_STAGE: S.STAGE_FINAL, S.TAG_TUNE_GROUP: g.gid, S.TAG_TUNE_PARAMS: T.params_json(best["params"]),
                S.TAG_TUNED_FROM: best["run_id"], S.TAG_TUNE_METRIC: f"{g.metric}:{g.mode}",
                S.TAG_TUNE_SPACE: T.space_json(g.dims)}
        for seed, split, cfg in T.final_configs(spec, g, best["params"]):
            if _complete_runs(ctx, cfg.hash()):
                res.skipped.append(cfg.hash())
                continue
            name = f"{g.model} final seed={seed}" + (f" split={split}" if split is not None else "")
            p = _payload(ctx, cfg, name, g.axes, tags,  # searched values: tag etbench.tune.params, not axes
                         _attach_or_close(ctx, cfg.hash()), sweep)  # closes the hash's other live runs
            out.append({**p, "threads": spec.resources.cpus_per_worker})
    return out
