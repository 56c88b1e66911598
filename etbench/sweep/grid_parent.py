"""The grid as one MLflow parent run: every sweep (plain or tuned) opens it, or re-opens it on ``--resume`` and on
a re-run into the same results folder, before its trials; records the grid file, the plan and the cost estimate,
and the grid's equivalence margins as the tag ``etbench.analysis.margins`` (the report reads them from the store);
passes its id to every trial (``mlflow.parentRunId``, set when a trial run is created or re-attached); and closes
it with the grid's outcome. The MLflow side is :mod:`etbench.tracking.grid_run`.

``<storage>/<grid>/grid_run.json`` names the run, with the store, experiment, the grid's key and the grid file's
hash; the key is also a tag of the run, so a lost json finds the same run again. An edited grid run into the same
folder stays the same parent (its trials are deduplicated against the same experiment): the earlier grid file,
plan and cost move to the run's ``history/<hash>/``. Opening the parent never stops a sweep: when the store refuses
it, the sweep says so and its trials run without a parent.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etbench import storage as stg
from etbench.sweep.analysis_spec import margins_tag, read_analysis
from etbench.sweep.grid import EFFECTIVE_FLOPS, GridSpec, Trial, estimate_cost, estimate_seconds
from etbench.tracking import grid_run as G
from etbench.tracking import schema as S


def _number(x: float) -> float | None:
    return None if not math.isfinite(x) else x


def plain_plan(spec: GridSpec, trials: list[Trial], source: str) -> dict[str, str]:
    """plan.json (every trial with its config hash and estimated cost) and cost.json (the totals `sweep plan`
    prints) of a plain grid."""
    rows, pflop, cpu_h, gpu_min, unknown = [], 0.0, 0.0, 0.0, 0
    for t in trials:
        c, secs = estimate_cost(t), estimate_seconds(t)
        rows.append({"config_hash": t.config_hash, "run_name": t.run_name, "model": t.model, "seed": t.seed,
                     "split": t.split, "axes": t.axes, "train_pflop": _number(c["train_pflop"]),
                     "estimated_s": _number(secs)})
        if not math.isfinite(c["train_pflop"]):
            unknown += 1
            continue
        rate = EFFECTIVE_FLOPS[t.config.task.kind]
        pflop += c["train_pflop"]
        cpu_h += c["train_pflop"] * 1e15 / rate["cpu"] / 3600
        gpu_min += c["train_pflop"] * 1e15 / rate["gpu"] / 60
    plan = {"grid": spec.name, "source": source, "trials": rows}
    cost = {"trials": len(trials), "unknown_cost_trials": unknown, "train_pflop": pflop, "cpu_trial_hours": cpu_h,
            "gpu_minutes": gpu_min, "max_concurrent_trials": spec.max_concurrent_trials,
            "effective_flops": EFFECTIVE_FLOPS}
    return {"plan.json": json.dumps(plan, indent=2, default=str), "cost.json": json.dumps(cost, indent=2)}


def tuned_plan(spec: GridSpec, source: str) -> dict[str, str]:
    """plan.json (the searches: model, axes, budget, metric, space) and cost.json (`sweep plan`'s estimate) of a
    tuned grid; its trials are drawn by the search, so the plan lists searches, not config hashes."""
    from etbench.sweep import tuning as T

    groups = [{"gid": g.gid, "model": g.model, "axes": g.axes, "metric": g.metric, "mode": g.mode,
               "budget": g.budget.model_dump(mode="json"),
               "space": {k: d.model_dump(mode="json") for k, d in g.dims.items()}} for g in T.groups(spec, source)]
    lines = T.plan_lines(spec, source)
    plan = {"grid": spec.name, "source": source, "seeds": spec.seeds, "splits": spec.splits, "searches": groups}
    return {"plan.json": json.dumps(plan, indent=2, default=str),
            "cost.json": json.dumps({"estimate": lines[-1], "plan": lines}, indent=2)}


def json_target(root: str, grid: str) -> str:
    """Where a grid's ``grid_run.json`` lives: ``<storage>/<grid>/`` (a path or a URI)."""
    return "/".join([root.rstrip("/"), grid, S.GRID_RUN_FILE])


def _read(target: str) -> dict[str, Any]:
    try:
        d = json.loads(stg.read_text(target)) if stg.exists(target) else {}
    except (OSError, ValueError):  # torn or unreadable: the run is found by its key tag instead
        return {}
    return d if isinstance(d, dict) else {}


def _warn(grid: str, what: str, e: Exception) -> None:
    print(f"warning: grid {grid}: {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def open_parent(*, uri: str, experiment: str, grid: str, grid_file: str | Path, root: str,
                artifact_root: Path | None, files: dict[str, str], progress: bool) -> str | None:
    """Open (or re-open) the grid's parent run, log its grid file and ``files``, write ``grid_run.json``; the run
    id, or None when the store refused it (the sweep goes on without a parent)."""
    target = json_target(root, grid)
    prev = _read(target)
    hint = prev.get("run_id") if prev.get("uri") == uri and prev.get("experiment") == experiment else None
    key = G.grid_key(grid, experiment, root)
    try:
        run_id = G.open_grid_run(uri, experiment, grid=grid, key=key, storage=root, artifact_root=artifact_root,
                                 hint=hint)
    except Exception as e:  # the trials need the store too and will say so; the parent is a convenience
        _warn(grid, "could not open the grid's parent run; trials run without one", e)
        return None
    content = hashlib.sha256(Path(grid_file).read_bytes()).hexdigest()
    try:
        G.log_grid_artifacts(uri, run_id, Path(grid_file), content, files)
    except Exception as e:
        _warn(grid, f"could not log the grid file and plan to the parent run {run_id}", e)
    try:  # what the report reads from the store alone: the grid's equivalence margins (analysis_spec)
        G.record_margins(uri, run_id, margins_tag(read_analysis(grid_file)))
    except Exception as e:
        _warn(grid, f"could not record the grid's equivalence margins on the parent run {run_id}", e)
    record = {"run_id": run_id, "uri": uri, "experiment": experiment, "grid": grid, "key": key, "storage": root,
              "grid_file": str(grid_file), "content_hash": content, "opened_unix": time.time()}
    try:
        stg.write_text(target, json.dumps(record, indent=2))
    except OSError as e:  # the next sweep finds the run by its key tag
        _warn(grid, f"could not write {target}", e)
    if progress:
        print(f"grid {grid}: MLflow parent run {run_id} (the trials are its children; named in {target})")
    return run_id


def adopt_orphans(uri: str, experiment: str, parent: str | None, hashes: set[str]) -> int:
    """Make the runs of ``hashes`` that have no parent (logged before grids had one) children of ``parent``."""
    if parent is None:
        return 0
    from etbench.tracking.lookup import runs_by_hash

    try:
        orphans = [r.run_id for h, refs in runs_by_hash(uri, experiment).items() if h in hashes
                   for r in refs if r.parent_run_id is None]
        G.adopt(uri, orphans, parent)
    except Exception as e:  # a UI grouping: never a reason to stop the sweep
        _warn(experiment, f"could not make earlier runs children of the parent run {parent}", e)
        return 0
    return len(orphans)


def outcome(res: Any, planned: set[str] | None) -> tuple[str, str | None]:
    """The parent's end status from a sweep result: FAILED when a trial failed, KILLED when planned trials were
    left unrun (``--only``, a stopped sweep), else FINISHED. ``planned``: the grid's config hashes (None: a tuned
    grid, whose trials the search draws)."""
    if res.failed:
        shown = ", ".join(sorted(res.failed)[:10])
        return "FAILED", f"{len(res.failed)} trial(s) failed: {shown}"
    if planned is not None:
        left = planned - set(res.finished) - set(res.skipped)
        if left:
            return "KILLED", (f"{len(left)} of {len(planned)} planned trial(s) not run (--only, or the sweep was "
                              f"stopped); a re-run continues them")
    return "FINISHED", None


@contextmanager
def closing(uri: str, parent: str | None, res: Any, planned: set[str] | None, grid: str) -> Iterator[None]:
    """Close the parent run when the block ends: with :func:`outcome`, or KILLED (interrupted) / FAILED (an error)
    when it raises; the error propagates."""
    try:
        yield
    except BaseException as exc:
        if parent is not None:
            interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
            _close(uri, parent, "KILLED" if interrupted else "FAILED",
                   f"sweep {'interrupted' if interrupted else 'failed'}: {type(exc).__name__}: {exc}", grid)
        raise
    if parent is not None:
        _close(uri, parent, *outcome(res, planned), grid)


def _close(uri: str, parent: str, status: str, reason: str | None, grid: str) -> None:
    try:
        G.close_grid_run(uri, parent, status, reason)
    except Exception as e:
        _warn(grid, f"could not close the parent run {parent} as {status}", e)
