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
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.config import CheckpointRetention, RunConfig
from etbench.engine.loop import LoopState, StopRequested
from etbench.engine.run import check_out, run_single
from etbench.tracking import schema as S
from etbench.tracking.identity import cumulative_wall_s, heartbeat, open_run, write_identity
from etbench.tracking.mlflow_log import RUN_ARTIFACTS, RunTracker


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


def start_tracking(spec: TrackingSpec, cfg: RunConfig, out: Path, data: dict[str, Any] | None = None
                   ) -> RunTracker:
    """The tracker of the trial in ``out``: its earlier run re-attached, or a new run; ``tracking.json`` written.
    Either way the run is a child of the grid's parent run when the spec names one (a re-attached run is re-tagged:
    it may predate the parent, or come from a sweep whose parent run was replaced)."""
    tracker = spec.tracker()
    tracker.identity_dir = Path(out)
    open_run(tracker, out, lambda: tracker.start(cfg, grid=spec.grid, axes=spec.axes, data=data,
                                                 extra_tags=spec.creation_tags()), fallback_run_id=spec.run_id)
    if spec.parent_run_id and tracker.attached:
        tracker.set_tag(S.TAG_PARENT_RUN, spec.parent_run_id)
    return tracker


def end_tracking(tracker: RunTracker, summary: dict[str, Any], out: Path) -> None:
    """The epochs MLflow lacks (from ``out/metrics.json``), summary, artifacts, FINISHED. ``cost/wall_s`` becomes
    the wall time over every attempt of the trial (from ``out/tracking.json``), also in ``summary`` and
    ``out/summary.json``."""
    metrics = Path(out) / "metrics.json"
    if metrics.exists():  # epochs the attempt recorded but MLflow lacks (held back until checkpointed): added now
        tracker.log_history(json.loads(metrics.read_text()))
    wall = cumulative_wall_s(out)
    if wall is not None and isinstance(summary.get("cost"), dict):
        summary["cost"]["wall_s"] = max(wall, float(summary["cost"].get("wall_s", 0.0)))
        if (Path(out) / "summary.json").exists():
            (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    tracker.log_summary(summary)
    tracker.log_artifacts(out, RUN_ARTIFACTS)
    tracker.finish("FINISHED")
    heartbeat(out)


def _continue_from(tracker: RunTracker, spec: TrackingSpec, cfg: RunConfig, out: Path, state: LoopState) -> None:
    """Before the first epoch of an attempt: the run must hold no epoch past the attempt's checkpoint (else it is
    closed KILLED and a new run takes over), and it gets the checkpointed epochs it lacks."""
    held = tracker.logged_epochs()
    if held and max(held) > state.epoch:
        from etbench.tracking.identity import Identity, read_identity

        old, prev = tracker.client, read_identity(out)
        old_id = tracker._id()
        run_id = tracker.start(cfg, grid=spec.grid, axes=spec.axes, extra_tags=spec.creation_tags())
        why = (f"held epochs up to {max(held)} but the trial restarted from epoch {state.epoch} (its checkpoint is "
               f"older or gone); continued as run {run_id}")
        old.set_tag(old_id, S.TAG_CLOSED_REASON, why)
        old.set_tag(old_id, S.TAG_ERROR, why)
        old.set_terminated(old_id, status="KILLED")
        if prev is not None:
            write_identity(out, Identity(run_id, tracker.uri, tracker.experiment, 1, prev.wall_s_prior,
                                         prev.attempt_started_unix, prev.updated_unix))
    for i, row in enumerate(state.history):
        tracker.log_epoch(i, row)


def run_tracked(cfg: RunConfig, out: Path, spec: TrackingSpec | None, *, resume: bool = False,
                progress: bool = True, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                retention: CheckpointRetention | None = None) -> dict[str, Any]:
    """:func:`etbench.engine.run.run_single` with MLflow tracking (when ``spec`` is given). Returns the summary."""
    if spec is None:
        return run_single(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch, retention=retention).summary
    out = Path(out)
    check_out(cfg, out, resume)  # before the run is opened: a refused folder leaves its run as it was
    tracker = start_tracking(spec, cfg, out)

    def committed(state: LoopState) -> None:  # the epochs up to this checkpoint stand: log those MLflow lacks
        for i, row in enumerate(state.history):
            tracker.log_epoch(i, row)

    try:
        result = run_single(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch,
                            on_start=lambda state: _continue_from(tracker, spec, cfg, out, state),
                            on_checkpoint=committed, retention=retention)
    except StopRequested:  # stopped early by the scheduler: the stage driver closes the run from its epochs
        raise
    except BaseException as exc:
        heartbeat(out)
        tracker.finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED", error_reason(exc))
        raise
    committed(result.state)
    data = result.summary.get("data", {})
    if "checksum" in data:
        tracker.set_tag(S.TAG_DATASET_CHECKSUM, str(data["checksum"]))
    end_tracking(tracker, result.summary, out)
    return result.summary
