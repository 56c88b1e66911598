"""Read one experiment's runs from MLflow into a pandas DataFrame (one row per run).

Columns: ``run_id``, ``status``, ``start_time``, ``end_time`` (ms), the etbench tags under short names (``task``,
``model``, ``dataset``, ``protocol``, ``seed``, ``split``, ``paper_comparable``, ``config_hash``, ``grid``,
``error``), one ``axis.<name>`` column per swept grid axis (numbers parsed when every value is a number),
``params.<key>`` and ``metrics.<name>`` (latest value), the names MLflow's ``search_runs`` uses.
The search pages through ``MlflowClient.search_runs`` page tokens, so any store size works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from etbench.tracking import schema

PAGE_SIZE = 1000
AXIS_PREFIX = "axis."
INCLUDED_STATUSES = ("FINISHED",)
FAILED_STATUSES = ("FAILED", "KILLED")

#: Short column name → tag name. All but the last four are required of an etbench run.
TAG_COLUMNS: dict[str, str] = {
    "task": schema.TAG_TASK,
    "model": schema.TAG_MODEL,
    "dataset": schema.TAG_DATASET,
    "protocol": schema.TAG_PROTOCOL,
    "seed": schema.TAG_SEED,
    "split": schema.TAG_SPLIT,
    "paper_comparable": schema.TAG_PAPER_COMPARABLE,
    "config_hash": schema.TAG_CONFIG_HASH,
    "grid": schema.TAG_GRID,
    "error": schema.TAG_ERROR,
}
REQUIRED_TAGS = ("task", "model", "dataset", "protocol", "seed", "split")


@dataclass
class RunTable:
    """The runs of one experiment: those analysed, those left out (with the reason), and the swept axes."""

    experiment: str
    experiment_id: str
    runs: pd.DataFrame
    excluded: pd.DataFrame
    axes: list[str] = field(default_factory=list)


def client_for(tracking_uri: str | None) -> MlflowClient:
    """An MLflow client on ``tracking_uri`` (None: MLflow's own default, e.g. $MLFLOW_TRACKING_URI)."""
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """Id of the experiment named ``experiment``; raise naming the experiments that do exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}; existing: {names}")
    return exp.experiment_id


def search_all(client: MlflowClient, exp_id: str, progress: Callable[[str], None] | None = None) -> list[Run]:
    """Every active run of the experiment, page by page."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE, page_token=token)
        runs.extend(page)
        if progress is not None:
            progress(f"  searched {len(runs)} runs")
        token = page.token
        if not token:
            return runs


def _row(run: Run) -> dict[str, object]:
    """Flatten one MLflow run into a row."""
    info, data = run.info, run.data
    row: dict[str, object] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }
    for col, tag in TAG_COLUMNS.items():
        row[col] = data.tags.get(tag)
    for tag, value in data.tags.items():
        if tag.startswith(schema.TAG_AXIS_PREFIX):
            row[AXIS_PREFIX + tag.removeprefix(schema.TAG_AXIS_PREFIX)] = value
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    return row


def parse_values(values: pd.Series) -> pd.Series:
    """Tag strings → numbers when every present value is a number (ints stay ints), else unchanged."""
    present = values.dropna()
    if present.empty:
        return values
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.isna().any():
        return values
    if (numbers == numbers.round()).all() and not present.astype(str).str.contains(r"[.eE]").any():
        return pd.to_numeric(values).astype("Int64")
    return pd.to_numeric(values).astype(float)


def _exclusion_reason(row: pd.Series, include_failed: bool) -> str | None:
    """Why a run is left out of the analysis, or None when it is analysed."""
    missing = [TAG_COLUMNS[c] for c in REQUIRED_TAGS if pd.isna(row[c])]
    if missing:
        return f"not an etbench run: missing tag(s) {', '.join(missing)}"
    allowed = INCLUDED_STATUSES + (FAILED_STATUSES if include_failed else ())
    if row["status"] not in allowed:
        error = row.get("error")
        detail = f": {error}" if isinstance(error, str) and error else ""
        hint = "" if include_failed or row["status"] not in FAILED_STATUSES else " (include_failed=True keeps it)"
        return f"status {row['status']}{detail}{hint}"
    return None


def runs_frame(runs: list[Run], *, include_failed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Analysed runs, excluded runs (run_id, status, reason) and the axis columns, from MLflow run objects."""
    frame = pd.DataFrame([_row(r) for r in runs])
    if frame.empty:
        frame = pd.DataFrame(columns=["run_id", "run_name", "status", "start_time", "end_time", *TAG_COLUMNS])
    reasons = frame.apply(_exclusion_reason, axis=1, args=(include_failed,)) if len(frame) else pd.Series(dtype=object)
    keep = reasons.isna() if len(frame) else pd.Series(dtype=bool)
    excluded = frame.loc[~keep, ["run_id", "status"]].assign(reason=reasons[~keep]).reset_index(drop=True)
    frame = frame.loc[keep].reset_index(drop=True)
    for col in ("seed", "split"):
        numbers = pd.to_numeric(frame[col], errors="coerce")
        bad = frame.loc[numbers.isna() | (numbers != numbers.round()), ["run_id", col]]
        if len(bad):
            raise ValueError(f"tag {TAG_COLUMNS[col]} must be an integer; runs {bad.values.tolist()[:5]} have others")
        frame[col] = numbers.astype("Int64")
    frame["paper_comparable"] = frame["paper_comparable"].map({"true": True, "false": False})
    axes = sorted(c for c in frame.columns if c.startswith(AXIS_PREFIX))
    for col in axes:
        frame[col] = parse_values(frame[col])
    axes = [a for a in axes if not _redundant(frame, a)]
    order = ["dataset", "protocol", "model", *axes, "split", "seed"]
    frame = frame.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)
    return frame, excluded, axes


def _redundant(frame: pd.DataFrame, axis: str) -> bool:
    """An axis whose value is always the run's model, seed or split (e.g. a "model" axis) is not a grid cell key."""
    present = frame[axis].notna()
    if not present.any():
        return True
    values = frame.loc[present, axis].astype(str)
    return any((values == frame.loc[present, c].astype(str)).all() for c in ("model", "seed", "split"))


def load_runs(
    experiment: str,
    tracking_uri: str | None = None,
    *,
    include_failed: bool = False,
    client: MlflowClient | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunTable:
    """All runs of ``experiment``; only FINISHED ones are analysed unless ``include_failed`` (FAILED, KILLED)."""
    client = client or client_for(tracking_uri)
    exp_id = experiment_id(client, experiment)
    runs, excluded, axes = runs_frame(search_all(client, exp_id, progress), include_failed=include_failed)
    return RunTable(experiment=experiment, experiment_id=exp_id, runs=runs, excluded=excluded, axes=axes)
