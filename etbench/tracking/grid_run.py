"""The grid's parent run in MLflow: one per grid (name, experiment, results folder), re-opened by every sweep.

MLflow's UI folds runs tagged ``mlflow.parentRunId`` under their parent, so a grid is one collapsible row. The
parent run holds the grid file, the plan and its cost estimate and, after ``etbench report``, the report. It has no
config hash, params or metrics; its tag ``etbench.kind = grid`` keeps it out of every reader of trial runs
(``etbench.tracking.schema``). The grid's run is the one the results folder's ``grid_run.json`` names (the sweep
passes it as ``hint``), else the newest active run of the experiment tagged with the grid's key, else a new one:
a lost json never makes a second parent.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from etbench.tracking import schema as S
from etbench.tracking.mlflow_log import ensure_experiment, git_commit

log = logging.getLogger(__name__)
GRID_ARTIFACTS = ("plan.json", "cost.json")  # beside grid/<grid file>


def grid_key(grid: str, experiment: str, storage: str) -> str:
    """The grid's identity: the same grid run into the same results folder and experiment has the same key."""
    return hashlib.sha256(f"{grid}\n{experiment}\n{storage}".encode()).hexdigest()[:16]


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _is_grid_run(run: Any, experiment_id: str, key: str) -> bool:
    tags = run.data.tags
    return (run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
            and tags.get(S.TAG_KIND) == S.KIND_GRID and tags.get(S.TAG_GRID_KEY) == key)


def find_grid_run(client: Any, experiment_id: str, key: str, hint: str | None = None) -> Any:
    """The grid's parent run (the ``hint`` run when it is the grid's, else the newest tagged with ``key``)."""
    if hint:
        try:
            run = client.get_run(hint)
        except Exception:  # not in this store
            run = None
        if run is not None and _is_grid_run(run, experiment_id, key):
            return run
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{S.TAG_KIND}` = '{S.KIND_GRID}' and "
                              f"tags.`{S.TAG_GRID_KEY}` = '{key}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_grid_run(uri: str, experiment: str, *, grid: str, key: str, storage: str,
                  artifact_root: Path | None = None, hint: str | None = None) -> str:
    """Re-open the grid's parent run (RUNNING again, the last close reason removed, the sweep counted in
    ``etbench.attempts``) or create it; returns its id."""
    client = _client(uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    run = find_grid_run(client, exp_id, key, hint)
    if run is None:
        name = f"grid {grid}"
        tags = {S.TAG_KIND: S.KIND_GRID, S.TAG_GRID: grid, S.TAG_GRID_KEY: key, S.TAG_GRID_STORAGE: storage,
                S.TAG_GIT_COMMIT: git_commit(), "mlflow.runName": name}
        return str(client.create_run(exp_id, tags=tags, run_name=name).info.run_id)
    run_id, tags = run.info.run_id, run.data.tags
    for stale in (S.TAG_CLOSED_REASON, S.TAG_ERROR):
        if stale in tags:
            client.delete_tag(run_id, stale)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, S.TAG_ATTEMPTS, str(int(tags.get(S.TAG_ATTEMPTS, "1") or 1) + 1))
    client.set_tag(run_id, S.TAG_GIT_COMMIT, git_commit())
    return str(run_id)


def log_grid_artifacts(uri: str, run_id: str, grid_file: Path, content_hash: str, files: dict[str, str]) -> None:
    """The grid file (``grid/<name>``) and ``files`` (artifact name → text: plan.json, cost.json). When the grid
    file changed since the last sweep, the earlier version's artifacts move to ``history/<old hash>/`` first
    (copied: MLflow artifacts cannot be renamed), so no version of the grid is lost."""
    client = _client(uri)
    old = client.get_run(run_id).data.tags.get(S.TAG_GRID_CONTENT_HASH)
    with tempfile.TemporaryDirectory(prefix="etbench-grid-run-") as tmp:
        if old and old != content_hash:
            keep = Path(tmp) / "history"
            for name in ("grid", *files):
                try:
                    got = Path(client.download_artifacts(run_id, name, str(keep)))
                except Exception:  # the earlier sweep had not logged it
                    continue
                dest = f"history/{old[:12]}"
                if got.is_dir():
                    client.log_artifacts(run_id, str(got), f"{dest}/{name}")
                else:
                    client.log_artifact(run_id, str(got), dest)
        client.log_artifact(run_id, str(grid_file), "grid")
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text)
            client.log_artifact(run_id, str(path))
    client.set_tag(run_id, S.TAG_GRID_CONTENT_HASH, content_hash)


def record_margins(uri: str, run_id: str, tag: str) -> None:
    """The grid's declared equivalence margins (JSON, ``etbench.sweep.analysis_spec.margins_tag``) as the parent's
    ``etbench.analysis.margins`` tag; set on every sweep, so an edited grid's margins replace the earlier ones."""
    _client(uri).set_tag(run_id, S.TAG_ANALYSIS_MARGINS, tag)


def adopt(uri: str, run_ids: list[str], parent: str) -> None:
    """Make ``run_ids`` (trial runs without a parent, e.g. logged before grids had one) children of ``parent``."""
    client = _client(uri)
    for run_id in run_ids:
        client.set_tag(run_id, S.TAG_PARENT_RUN, parent)


def close_grid_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End the parent run with the grid's outcome: FINISHED, or FAILED / KILLED with ``etbench.closed_reason``."""
    client = _client(uri)
    if reason:
        client.set_tag(run_id, S.TAG_CLOSED_REASON, reason[:5000])
    client.set_terminated(run_id, status=status)


def grid_runs(client: Any, experiment: str) -> list[Any]:
    """Every active parent run of ``experiment`` (one per grid and results folder that logged into it)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=f"tags.`{S.TAG_KIND}` = '{S.KIND_GRID}'",
                                   max_results=1000))


def attach_report(experiment: str, uri: str | None, out: Path) -> list[str]:
    """Log the report folder ``out`` (its hidden cache left out) under ``report/`` of every parent run of
    ``experiment``; returns their ids. Never raises: a report stands without it (no store, no parent run, an
    unreachable server are logged as warnings), and a SQLite file that does not exist is never created."""
    if not uri:
        return []
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).is_file():
        return []
    try:
        client = _client(uri)
        ids = [r.info.run_id for r in grid_runs(client, experiment)]
        for run_id in ids:
            for entry in sorted(Path(out).iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    client.log_artifacts(run_id, str(entry), f"{S.REPORT_ARTIFACT_DIR}/{entry.name}")
                else:
                    client.log_artifact(run_id, str(entry), S.REPORT_ARTIFACT_DIR)
        return ids
    except Exception as e:  # the report is written; its copy in the tracker is a convenience
        log.warning("could not attach the report %s to the grid run of %r at %s: %s", out, experiment, uri, e)
        return []
