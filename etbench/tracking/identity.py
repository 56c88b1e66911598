"""A trial's MLflow run identity, kept in its folder so that every retry, restart and ``--resume`` finds it.

``<trial folder>/tracking.json`` (replaced atomically) holds the run id, the store and experiment it lives in, how
many attempts opened it, and the wall time of the earlier attempts: ``wall_s_prior`` plus the current attempt's
``attempt_started_unix`` → ``updated_unix`` (a heartbeat refreshed every logged epoch, so a SIGKILLed attempt
still counts up to its last epoch). It is written before the first epoch, on every path: one-worker runs
(:func:`etbench.engine.tracked.run_tracked`), Ray Train runs (:func:`etbench.engine.launch.fit`), sweeps and
``etbench train``.

:func:`open_run` is the one rule for which run a trial logs to:

- the folder names a run in this store that is not terminal (RUNNING, SCHEDULED), or ended FAILED/KILLED →
  re-attach it: status RUNNING again, the stale ``etbench.error`` removed, ``etbench.attempts`` incremented;
- it names a complete FINISHED run → :class:`RunDoneError` (the folder holds a finished result);
- it names a run stopped early or superseded (a truncated or replaced result), or none → a new run, unless the
  caller hands a fallback run id (an older trial folder written before this file existed).

``pending`` records what the tracking server still has to be told when it was unreachable (see
:mod:`etbench.tracking.outage`): ``{"status": "FINISHED"}`` for a trial whose results are complete on disk, or the
FAILED/KILLED status and error of an attempt whose failure handler could not reach it. A new attempt clears it (it
re-opens the run); :func:`etbench.engine.tracked.sync_pending` applies it without one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from etbench.errors import EtbenchError
from etbench.tracking import schema as S

IDENTITY_FILE = "tracking.json"
REOPENABLE = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")


class RunDoneError(EtbenchError, RuntimeError):
    """The trial folder belongs to a complete FINISHED run; it is never re-opened."""


@dataclass
class Identity:
    run_id: str
    uri: str
    experiment: str
    attempts: int = 1
    wall_s_prior: float = 0.0  # wall time of the attempts before the current one
    attempt_started_unix: float = 0.0
    updated_unix: float = 0.0
    pending: dict[str, Any] | None = None  # {"status", "error", "since_unix"}: owed to an unreachable server

    def wall_s(self, now: float | None = None) -> float:
        """Wall time over every attempt, the current one up to ``now`` (default: its last heartbeat)."""
        end = self.updated_unix if now is None else now
        return self.wall_s_prior + max(0.0, end - self.attempt_started_unix)


def identity_path(out: str | Path) -> Path:
    return Path(out) / IDENTITY_FILE


def read_identity(out: str | Path) -> Identity | None:
    """The identity kept in ``out`` (None when absent or unreadable: a torn file from before atomic writes)."""
    p = identity_path(out)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or not d.get("run_id"):
        return None
    known = set(Identity.__dataclass_fields__)
    return Identity(**{k: v for k, v in d.items() if k in known})


def write_identity(out: str | Path, ident: Identity) -> None:
    """Replace ``out/tracking.json`` atomically (a kill mid-write leaves the previous complete file)."""
    p = identity_path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{IDENTITY_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(ident), indent=2))
    os.replace(tmp, p)


def heartbeat(out: str | Path) -> None:
    """Refresh the current attempt's ``updated_unix`` (its wall time so far survives a kill)."""
    ident = read_identity(out)
    if ident is not None:
        ident.updated_unix = time.time()
        write_identity(out, ident)


def mark_pending(out: str | Path, status: str, error: str | None = None) -> None:
    """Record in ``out/tracking.json`` the terminal status (and error) the unreachable server was not told."""
    ident = read_identity(out)
    if ident is not None:
        ident.pending = {"status": status, "error": error[:5000] if error else None, "since_unix": time.time()}
        write_identity(out, ident)


def clear_pending(out: str | Path) -> None:
    ident = read_identity(out)
    if ident is not None and ident.pending is not None:
        ident.pending = None
        write_identity(out, ident)


def cumulative_wall_s(out: str | Path) -> float | None:
    """Wall time of the trial over all its attempts, up to now; None without an identity file."""
    ident = read_identity(out)
    return None if ident is None else ident.wall_s(time.time())


def reopen(client: Any, run_id: str, attempts: int) -> None:
    """Make ``run_id`` live again for a new attempt: RUNNING, the stale error removed, the attempt counted."""
    run = client.get_run(run_id)
    if S.TAG_ERROR in run.data.tags:
        client.delete_tag(run_id, S.TAG_ERROR)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, S.TAG_ATTEMPTS, str(attempts))


def _usable(client: Any, run_id: str, experiment_id: str) -> Any:
    """The run if it exists in this store and experiment and is not deleted, else None."""
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # not in this store; but a server that cannot answer is no answer: the caller waits
        from etbench.tracking.outage import unreachable

        if unreachable(exc):
            raise
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    return run


def open_run(tracker: Any, out: str | Path, create: Any, *, fallback_run_id: str | None = None) -> Identity:
    """Attach ``tracker`` (a :class:`etbench.tracking.mlflow_log.RunTracker`) to the trial's run and write its
    identity to ``out`` before any epoch. ``create()`` starts a new run (returns its id). See the module doc."""
    client, now = tracker.client, time.time()
    prev = read_identity(out)
    candidates = [(prev.run_id, prev)] if prev is not None and prev.uri == tracker.uri else []
    if fallback_run_id and not candidates:
        candidates.append((fallback_run_id, None))
    for run_id, ident in candidates:
        run = _usable(client, run_id, tracker.experiment_id)
        if run is None:
            continue
        tags = run.data.tags
        if run.info.status == "FINISHED" and not tags.get(S.TAG_STOPPED_EARLY) and tags.get(S.TAG_SUPERSEDED) != "true":
            raise RunDoneError(f"{out} holds the FINISHED run {run_id}; it is never re-opened (a sweep skips it; "
                               f"`--force` supersedes it)")
        if run.info.status not in REOPENABLE or tags.get(S.TAG_SUPERSEDED) == "true":
            continue  # stopped early (a truncated search run) or superseded: a new run, never this one
        attempts = max(ident.attempts if ident else 1, int(tags.get(S.TAG_ATTEMPTS, "1") or 1)) + 1
        prior = ident.wall_s() if ident else 0.0
        reopen(client, run_id, attempts)
        tracker.attach(run_id)
        new = Identity(run_id, tracker.uri, tracker.experiment, attempts, prior, now, now)
        write_identity(out, new)
        return new
    run_id = create()  # etbench.attempts is set from the second attempt on (absent: opened once)
    new = Identity(run_id, tracker.uri, tracker.experiment, 1, 0.0, now, now)
    write_identity(out, new)
    return new


def close_live_runs(uri: str, refs: list[Any], keep: str | None, reason: str) -> list[str]:
    """Close every non-terminal (RUNNING/SCHEDULED) run in ``refs`` but ``keep`` as KILLED with ``reason``;
    returns the closed run ids. A sweep does this for each planned config hash, so one hash has one live run."""
    closing = [r.run_id for r in refs if r.status in ("RUNNING", "SCHEDULED") and r.run_id != keep]
    if not closing:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for run_id in closing:
        client.set_tag(run_id, S.TAG_CLOSED_REASON, reason)
        client.set_tag(run_id, S.TAG_ERROR, reason)
        client.set_terminated(run_id, status="KILLED")
    return closing


def supersede_runs(uri: str, refs: list[Any], when: str) -> list[str]:
    """``--force``: tag every run in ``refs`` not yet superseded ``etbench.superseded=true`` (and the time); live
    ones are closed KILLED. Nothing is deleted: the runs stay in the store, out of dedup, resume and reports."""
    todo = [r for r in refs if not r.superseded]
    if not todo:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for r in todo:
        client.set_tag(r.run_id, S.TAG_SUPERSEDED, "true")
        client.set_tag(r.run_id, S.TAG_SUPERSEDED_AT, when)
        if r.status in ("RUNNING", "SCHEDULED"):
            client.set_tag(r.run_id, S.TAG_CLOSED_REASON, f"superseded by --force at {when}")
            client.set_terminated(r.run_id, status="KILLED")
    return [r.run_id for r in todo]
