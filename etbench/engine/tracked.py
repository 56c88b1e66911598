"""A run with MLflow tracking around it: open (or re-attach) the tracked run, log every epoch, then summary and
artifacts.

Run identity (:mod:`etbench.tracking.identity`): the run id is written to ``<out>/tracking.json`` before the first
epoch, and every later attempt on the same folder (a Ray Tune retry, a restarted or ``--resume``-d sweep,
``etbench train --resume``) re-attaches that run, also from FAILED or KILLED. An epoch reaches MLflow once its
checkpoint is written, so the run never holds an epoch that a later attempt trains again; an attempt that resumes
from a checkpoint first appends the checkpointed epochs the run lacks. ``cost/wall_s`` sums every attempt.

A run that raises (including a diverged, NaN run) is marked FAILED with its reason and the error re-raised; what
was already logged stays in the store. A run stopped early by a scheduler (:class:`StopRequested`) is left open for
the tuning stage to close (``etbench.sweep.tune_stage``).

Tracking outages (:mod:`etbench.tracking.outage`): a server that is unreachable while the run trains costs an epoch
seconds, never the run: its epochs wait in the trial folder and go out with the next flush that reaches it. The run
is opened (before the first epoch) and closed (epochs, summary, FINISHED) with bounded waits; when the server stays
away past the final wait, the results stay complete on disk, ``tracking.json`` records FINISHED as pending, and the
next attempt on the folder (a Tune retry, ``etbench sweep run --resume``, ``etbench train --resume``) only syncs the
run. A failure handler never raises a tracking error over the training error (:func:`fail_run`).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.config import CheckpointRetention, RunConfig
from etbench.engine.loop import LoopState, StopRequested
from etbench.engine.provenance import in_process_tags
from etbench.engine.run import check_out, run_single
from etbench.tracking import identity as run_identity
from etbench.tracking import outage
from etbench.tracking import schema as S
from etbench.tracking.identity import RunDoneError, cumulative_wall_s, heartbeat, open_run, read_identity
from etbench.tracking.mlflow_log import RUN_ARTIFACTS, RunTracker
from etbench.tracking.outage import TrackingPendingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingSpec:
    """Where and under which names a run is tracked (picklable: it travels to Ray workers)."""

    uri: str
    experiment: str
    grid: str
    run_name: str
    axes: dict[str, Any] = field(default_factory=dict)
    artifact_root: str | None = None
    run_id: str | None = None  # the run to attach to when the trial folder names none (an older folder)
    tags: dict[str, str] = field(default_factory=dict)  # extra tags at creation (tuning stage, selected-from run)
    identity_dir: str | None = None  # the trial folder whose tracking.json the tracker's epochs refresh
    commit_every: int | None = None  # Ray Train ranks: an epoch reaches MLflow once a checkpoint covers it
    parent_run_id: str | None = None  # the grid's parent run (tag mlflow.parentRunId; etbench.tracking.grid_run)

    def creation_tags(self) -> dict[str, str]:
        """The extra tags of a new run: ``tags`` plus the nested-run tag naming the grid's parent run."""
        return {**self.tags, **({S.TAG_PARENT_RUN: self.parent_run_id} if self.parent_run_id else {})}

    def tracker(self) -> RunTracker:
        tracker = RunTracker(self.uri, self.experiment, self.run_name,
                             Path(self.artifact_root) if self.artifact_root else None)
        tracker.identity_dir = Path(self.identity_dir) if self.identity_dir else None
        tracker.commit_every = self.commit_every
        return tracker


def error_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])


def _bounded(tracker: RunTracker, fn: Callable[[], Any], budget_s: float, what: str) -> Any:
    """``fn()`` now (a local store), or on a server while it is unreachable for up to ``budget_s`` seconds."""
    if not tracker.sink:
        return fn()
    return outage.wait_for(fn, budget_s, what, on_retry=tracker.mark_stale)


def start_tracking(spec: TrackingSpec, cfg: RunConfig, out: Path, data: dict[str, Any] | None = None, *,
                   tags: dict[str, str] | None = None) -> RunTracker:
    """The tracker of the trial in ``out``: its earlier run re-attached, or a new run; ``tracking.json`` written.
    Either way the run is a child of the grid's parent run when the spec names one (a re-attached run is re-tagged:
    it may predate the parent, or come from a sweep whose parent run was replaced). A server that is unreachable
    is waited for (``$ETBENCH_TRACKING_START_WAIT_S``): the run id must be on disk before the first epoch.

    ``tags``: the provenance and placement of the process that trains (:mod:`etbench.engine.provenance`), set on a
    new run and again on a re-attached one (a retry may run on another node). A Ray Train driver passes none:
    rank 0 sets them (:mod:`etbench.engine.worker`)."""
    tracker = spec.tracker()
    tracker.identity_dir = Path(out)

    def opened() -> None:
        open_run(tracker, out, lambda: tracker.start(cfg, grid=spec.grid, axes=spec.axes, data=data,
                                                     extra_tags={**spec.creation_tags(), **(tags or {})}),
                 fallback_run_id=spec.run_id)
        if spec.parent_run_id and tracker.attached:
            tracker.set_tag(S.TAG_PARENT_RUN, spec.parent_run_id)
        if tags and tracker.attached:
            tracker.set_tags(tags)

    _bounded(tracker, opened, outage.start_wait_s(), "opening the run")
    return tracker


def end_tracking(tracker: RunTracker, summary: dict[str, Any], out: Path, *, checksum: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
    """The epochs MLflow lacks (from ``out/metrics.json``), the dataset checksum tag (and ``tags``: rank 0's
    provenance, in case setting them at its start met an outage), summary, artifacts, FINISHED.
    ``cost/wall_s`` becomes the wall time over every attempt of the trial (from ``out/tracking.json``), also in
    ``summary`` and ``out/summary.json``.

    A server that is unreachable is waited for (:func:`etbench.tracking.outage.final_wait_s`: by default as long as
    the trial ran); if it stays away, FINISHED is recorded as pending in ``tracking.json`` and
    :class:`TrackingPendingError` raised — the results are complete on disk, and the next attempt syncs them."""
    out = Path(out)
    wall = cumulative_wall_s(out)
    if wall is not None and isinstance(summary.get("cost"), dict):
        summary["cost"]["wall_s"] = max(wall, float(summary["cost"].get("wall_s", 0.0)))
        if (out / "summary.json").exists():
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    def close() -> None:
        metrics = out / "metrics.json"
        if metrics.exists():  # epochs the attempt recorded but MLflow lacks (held back until checkpointed, or
            tracker.log_history(json.loads(metrics.read_text()))  # waiting out an outage): added now
        if checksum is not None:
            tracker.set_tag(S.TAG_DATASET_CHECKSUM, checksum)
        tracker.set_tags(tags or {})
        tracker.log_summary(summary)
        tracker.log_artifacts(out, RUN_ARTIFACTS)
        tracker.finish("FINISHED")

    budget = outage.final_wait_s(wall)
    try:
        _bounded(tracker, close, budget, "closing the run")
    except outage.TrackingUnavailableError as exc:
        heartbeat(out)
        run_identity.mark_pending(out, "FINISHED")
        msg = (f"the run's results are complete in {out}, but the MLflow server {tracker.uri} stayed unreachable "
               f"for {budget:.0f} s: run {tracker.run_id} is left RUNNING, FINISHED pending in "
               f"{out / 'tracking.json'}; `etbench sweep run --resume` (or `etbench train --resume`) syncs it "
               f"without training again (a longer wait: ${outage.FINAL_WAIT_ENV})")
        log.error(msg)
        raise TrackingPendingError(msg) from exc
    run_identity.clear_pending(out)
    heartbeat(out)


def fail_run(uri: str, run_id: str | None, out: Path, status: str, reason: str) -> None:
    """A failure handler's MLflow call: ``run_id`` marked ``status`` with ``reason``, in one short try. It never
    raises: a tracking error must not replace the training error; when the store cannot be told, the failure is
    written to ``out/tracking.json`` (``pending``) for the next attempt or :func:`sync_pending`."""
    heartbeat(out)
    prev = read_identity(out)
    if not run_id or (prev is not None and (prev.pending or {}).get("status") == "FINISHED"):
        return  # a run whose results are complete and only wait to be synced is never marked failed
    try:
        from mlflow.tracking import MlflowClient

        with outage.short_calls():
            client = MlflowClient(uri)
            client.set_tag(run_id, S.TAG_ERROR, reason[:5000])
            client.set_terminated(run_id, status=status)
    except Exception as exc:
        run_identity.mark_pending(out, status, reason)
        log.warning("could not mark MLflow run %s %s (%s: %s); recorded in %s", run_id, status, type(exc).__name__,
                    exc, Path(out) / "tracking.json")


def sync_pending(out: Path) -> str | None:
    """Tell the store what ``out/tracking.json`` records as pending; the status applied, or None (nothing pending).
    FINISHED re-sends the missing epochs, summary and artifacts from the folder (``summary.json``)."""
    ident = read_identity(out)
    if ident is None or not ident.pending:
        return None
    status, error = ident.pending.get("status", "FAILED"), ident.pending.get("error")
    tracker = RunTracker(ident.uri, ident.experiment, "")
    tracker.identity_dir = Path(out)
    tracker.attach(ident.run_id)
    if status == "FINISHED":
        end_tracking(tracker, json.loads((Path(out) / "summary.json").read_text()), out)
        return status

    def close() -> None:
        if error:
            tracker.set_tag(S.TAG_ERROR, error)
        tracker.finish(status)

    _bounded(tracker, close, outage.start_wait_s(), f"marking the run {status}")
    run_identity.clear_pending(out)
    return status


def _sync_only(spec: TrackingSpec, cfg: RunConfig, out: Path) -> dict[str, Any] | None:
    """An earlier attempt trained to the end but could not tell MLflow (FINISHED pending): re-open its run and
    send what it lacks, without training again. None when the folder holds no such result."""
    ident = read_identity(out)
    if ident is None or not ident.pending or ident.pending.get("status") != "FINISHED":
        return None
    if not (out / "summary.json").exists() or not (out / "metrics.json").exists():
        return None
    summary = json.loads((out / "summary.json").read_text())
    try:
        tracker = start_tracking(spec, cfg, out)
    except RunDoneError:  # FINISHED did land (its answer was lost): nothing left to send
        run_identity.clear_pending(out)
        return summary
    end_tracking(tracker, summary, out)
    return summary


def _continue_from(tracker: RunTracker, spec: TrackingSpec, cfg: RunConfig, out: Path, state: LoopState,
                   tags: dict[str, str]) -> None:
    """Before the first epoch of an attempt: the run must hold no epoch past the attempt's checkpoint (else it is
    closed KILLED and a new run takes over), and it gets the checkpointed epochs it lacks."""
    held = tracker.logged_epochs()
    if held and max(held) > state.epoch:
        from etbench.tracking.identity import Identity, write_identity

        old, prev = tracker.client, read_identity(out)
        old_id = tracker._id()
        run_id = tracker.start(cfg, grid=spec.grid, axes=spec.axes, extra_tags={**spec.creation_tags(), **tags})
        if prev is not None:  # the folder names the new run first: an outage from here on leaves no doubt which
            write_identity(out, Identity(run_id, tracker.uri, tracker.experiment, 1, prev.wall_s_prior,
                                         prev.attempt_started_unix, prev.updated_unix))
        why = (f"held epochs up to {max(held)} but the trial restarted from epoch {state.epoch} (its checkpoint is "
               f"older or gone); continued as run {run_id}")  # (left live if the server goes now: the next
        old.set_tag(old_id, S.TAG_CLOSED_REASON, why)  # sweep plan closes a live run its folder does not name)
        old.set_tag(old_id, S.TAG_ERROR, why)
        old.set_terminated(old_id, status="KILLED")
    tracker.log_epochs({i + 1: row for i, row in enumerate(state.history)})


def run_tracked(cfg: RunConfig, out: Path, spec: TrackingSpec | None, *, resume: bool = False,
                progress: bool = True, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                retention: CheckpointRetention | None = None) -> dict[str, Any]:
    """:func:`etbench.engine.run.run_single` with MLflow tracking (when ``spec`` is given). Returns the summary."""
    if spec is None:
        return run_single(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch, retention=retention).summary
    out = Path(out)
    check_out(cfg, out, resume)  # before the run is opened: a refused folder leaves its run as it was
    if resume and (synced := _sync_only(spec, cfg, out)) is not None:
        return synced
    tags = in_process_tags(cfg)  # this process trains: its code, host, device and precision regime
    tracker = start_tracking(spec, cfg, out, tags=tags)

    def committed(state: LoopState) -> None:  # the epochs up to this checkpoint stand: log those MLflow lacks
        tracker.log_epochs({i + 1: row for i, row in enumerate(state.history)})

    def continued(state: LoopState) -> None:
        _bounded(tracker, lambda: _continue_from(tracker, spec, cfg, out, state, tags), outage.start_wait_s(),
                 "opening the run")

    try:
        result = run_single(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch, on_start=continued,
                            on_checkpoint=committed, retention=retention)
    except StopRequested:  # stopped early by the scheduler: the stage driver closes the run from its epochs
        raise
    except BaseException as exc:
        fail_run(tracker.uri, tracker.run_id, out, "FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED",
                 error_reason(exc))
        raise
    committed(result.state)
    data = result.summary.get("data", {})
    end_tracking(tracker, result.summary, out, checksum=str(data["checksum"]) if "checksum" in data else None)
    return result.summary
