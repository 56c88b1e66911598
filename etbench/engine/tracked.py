"""A run with MLflow tracking around it: start the tracked run, log every epoch, then summary and artifacts.

A run that raises (including a diverged, NaN run) is marked FAILED with its reason and the error re-raised; what
was already logged stays in the store. A run stopped early by a scheduler (:class:`StopRequested`) is left open for
the tuning stage to close (``etbench.sweep.tune_stage``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.config import RunConfig
from etbench.engine.loop import StopRequested
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
    run_id: str | None = None  # attach to an existing run instead of creating one (resumed trials)
    tags: dict[str, str] = field(default_factory=dict)  # extra tags at creation (tuning stage, selected-from run)

    def tracker(self) -> RunTracker:
        return RunTracker(self.uri, self.experiment, self.run_name,
                          Path(self.artifact_root) if self.artifact_root else None)


def error_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(exc)[-6:])


def start_tracking(spec: TrackingSpec, cfg: RunConfig, data: dict[str, Any] | None) -> RunTracker:
    tracker = spec.tracker()
    if spec.run_id:
        tracker.attach(spec.run_id)
    else:
        tracker.start(cfg, grid=spec.grid, axes=spec.axes, data=data, extra_tags=spec.tags)
    return tracker


def end_tracking(tracker: RunTracker, summary: dict[str, Any], out: Path) -> None:
    tracker.log_summary(summary)
    tracker.log_artifacts(out, RUN_ARTIFACTS)
    tracker.finish("FINISHED")


def run_tracked(cfg: RunConfig, out: Path, spec: TrackingSpec | None, *, resume: bool = False,
                progress: bool = True, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                ) -> dict[str, Any]:
    """:func:`etbench.engine.run.run_single` with MLflow tracking (when ``spec`` is given). Returns the summary."""
    from etbench.engine.run import run_single

    if spec is None:
        return run_single(cfg, out, resume=resume, progress=progress, on_epoch=on_epoch).summary
    tracker = spec.tracker()
    if spec.run_id:
        tracker.attach(spec.run_id)
    else:
        tracker.start(cfg, grid=spec.grid, axes=spec.axes, extra_tags=spec.tags)

    def epoch(e: int, row: dict[str, float]) -> None:
        tracker.log_epoch(e, row)
        if on_epoch is not None:
            on_epoch(e, row)

    try:
        result = run_single(cfg, out, resume=resume, progress=progress, on_epoch=epoch)
    except StopRequested:  # stopped early by the scheduler: the stage driver closes the run from its epochs
        raise
    except BaseException as exc:
        tracker.finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED", error_reason(exc))
        raise
    data = result.summary.get("data", {})
    if "checksum" in data:
        from etbench.tracking.schema import TAG_DATASET_CHECKSUM

        tracker.client.set_tag(tracker._id(), TAG_DATASET_CHECKSUM, str(data["checksum"]))
    end_tracking(tracker, result.summary, out)
    return result.summary
