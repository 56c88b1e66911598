"""Read one experiment's runs from MLflow into a pandas DataFrame (one row per run).

Columns: ``run_id``, ``status``, ``start_time``, ``end_time`` (ms), the etbench tags under short names (``task``,
``model``, ``dataset``, ``protocol``, ``seed``, ``split``, ``paper_comparable``, ``config_hash``, ``grid``,
``error``), one ``axis.<name>`` column per swept grid axis (numbers parsed when every value is a number),
``params.<key>`` and ``metrics.<name>`` (latest value), the names MLflow's ``search_runs`` uses.
The search pages through ``MlflowClient.search_runs`` page tokens, so any store size works. A SQL store
(sqlite, postgresql, mysql, mssql URIs) is read with four queries on MLflow's tables instead (runs, tags, params,
latest_metrics: what ``search_runs`` itself reads), which skips building an MLflow ``Run`` object per run — the
same frame (tested) in a fraction of the time at thousands of runs.

One FINISHED run per replicate (grid cell, seed, split) is analysed, the newest; older runs of the same science
config (one that differed only in an execution setting, say) are listed among the exclusions
(:func:`drop_duplicates`), and runs of one replicate with different configs stop the analysis with their names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from etbench.hashing import EXECUTION_FIELDS
from etbench.tracking import schema

if TYPE_CHECKING:  # MLflow is imported when a client is first used: a report of a local SQL store never needs it
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

PAGE_SIZE = 1000
AXIS_PREFIX = "axis."
INCLUDED_STATUSES = ("FINISHED",)
FAILED_STATUSES = ("FAILED", "KILLED")

#: Short column name → tag name. All but the last seven are required of an etbench run.
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
    "stage": schema.TAG_STAGE,  # set on the runs of a tuned grid (search / final stage)
    "superseded": schema.TAG_SUPERSEDED,  # "true" on a run `etbench sweep run --force` replaced: never analysed
    "kind": schema.TAG_KIND,  # "grid" on a grid's parent run: no trial, ignored (not even listed as left out)
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


class LazyClient:
    """An ``MlflowClient`` made on first use. Making one on a SQL store imports and checks MLflow's SQL store
    (seconds); a report of a SQL store whose artifacts are local folders never needs it."""

    def __init__(self, tracking_uri: str | None) -> None:
        self._uri = tracking_uri
        self._client: MlflowClient | None = None

    def _real(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self._uri)
        return self._client

    @property
    def tracking_uri(self) -> str:
        return self._uri or self._real().tracking_uri

    def __getattr__(self, name: str) -> object:
        return getattr(self._real(), name)


def client_for(tracking_uri: str | None) -> MlflowClient:
    """An MLflow client on ``tracking_uri`` (None: MLflow's own default, e.g. $MLFLOW_TRACKING_URI), made lazily."""
    return LazyClient(tracking_uri)  # type: ignore[return-value]


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///path`` URI (read with the standard library's sqlite3, which
    spares the SQLAlchemy import and its row processing); None for other SQL stores, in-memory or with options."""
    if not tracking_uri.startswith("sqlite:///") or "?" in tracking_uri:
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return path if path.name not in ("", ":memory:") and path.is_file() else None


@contextmanager
def _sql_reader(tracking_uri: str) -> Iterator[Callable[[str, dict[str, object]], pd.DataFrame]]:
    """``read(query, params)`` → DataFrame on the store's database (named ``:param`` placeholders), read only."""
    path = _sqlite_file(tracking_uri)
    if path is not None:
        import sqlite3

        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            yield lambda query, params: pd.read_sql(query, conn, params=params)
        finally:
            conn.close()
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(tracking_uri)
    try:
        with engine.connect() as sa_conn:
            yield lambda query, params: pd.read_sql(text(query), sa_conn, params=params)
    finally:
        engine.dispose()


def _sql_experiment_id(tracking_uri: str, experiment: str) -> str | None:
    """The id of the one experiment named ``experiment`` in a SQL store, read from MLflow's experiments table."""
    try:
        with _sql_reader(tracking_uri) as read:
            rows = read("SELECT experiment_id FROM experiments WHERE name = :n", {"n": experiment})
    except Exception:
        return None
    return str(rows.iloc[0, 0]) if len(rows) == 1 else None


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """Id of the experiment named ``experiment``; raise naming the experiments that do exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        from etbench.analysis import AnalysisError

        raise AnalysisError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}; existing: {names}")
    return exp.experiment_id


def search_all(client: MlflowClient, exp_id: str, progress: Callable[[str], None] | None = None) -> list[Run]:
    """Every active run of the experiment, page by page."""
    from mlflow.entities import ViewType

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


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
INFO_COLUMNS = ["run_id", "run_name", "status", "start_time", "end_time", "artifact_uri"]


def is_sql_store(tracking_uri: str | None) -> bool:
    """Whether ``tracking_uri`` names a database MLflow reads through SQLAlchemy (not a server or a folder)."""
    return bool(tracking_uri) and str(tracking_uri).split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def _row(run: Run) -> dict[str, object]:
    """Flatten one MLflow run into a row."""
    info, data = run.info, run.data
    row: dict[str, object] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "artifact_uri": info.artifact_uri,
    }
    for col, tag in TAG_COLUMNS.items():
        row[col] = data.tags.get(tag)
    for tag, value in data.tags.items():
        if tag.startswith(schema.TAG_AXIS_PREFIX):
            row[AXIS_PREFIX + tag.removeprefix(schema.TAG_AXIS_PREFIX)] = value
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})
    return row


def sql_frame(tracking_uri: str, exp_id: str) -> pd.DataFrame:
    """The wide run frame (as ``_row`` builds it) of the experiment's active runs, straight from MLflow's tables.

    Rows come in ``search_runs``' default order (start_time descending, then run id); metrics are the
    latest_metrics values (NaN where MLflow stored is_nan), exactly what a ``Run`` object's ``data.metrics`` holds.
    """
    where = "r.experiment_id = :exp AND r.lifecycle_stage = 'active'"
    args: dict[str, object] = {"exp": int(exp_id)}
    with _sql_reader(tracking_uri) as read:
        info = read("SELECT r.run_uuid AS run_id, r.name AS run_name, r.status, r.start_time, r.end_time, "
                    f"r.artifact_uri FROM runs r WHERE {where} ORDER BY r.start_time DESC, r.run_uuid", args)
        parts = {kind: read(
            f"SELECT t.run_uuid AS run_id, t.key, t.value{', t.is_nan' if kind == 'latest_metrics' else ''} "
            f"FROM {kind} t JOIN runs r ON r.run_uuid = t.run_uuid WHERE {where}", args)
            for kind in ("tags", "params", "latest_metrics")}
    metrics = parts["latest_metrics"]
    metrics["value"] = metrics["value"].astype(float).where(~metrics.pop("is_nan").astype(bool), float("nan"))
    tags = parts["tags"]
    wide = [_pivot(tags[tags["key"].isin(list(TAG_COLUMNS.values()))], "", {v: k for k, v in TAG_COLUMNS.items()}),
            _pivot(tags[tags["key"].str.startswith(schema.TAG_AXIS_PREFIX)], AXIS_PREFIX, strip=schema.TAG_AXIS_PREFIX),
            _pivot(parts["params"], "params."), _pivot(metrics, "metrics.")]
    frame = info.set_index("run_id")
    for part in wide:
        frame = frame.join(part, how="left")
    for col in TAG_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    return frame.reset_index()


def _pivot(long: pd.DataFrame, prefix: str, rename: dict[str, str] | None = None, strip: str = "") -> pd.DataFrame:
    """(run_id, key, value) rows → one column per key, named ``prefix + key`` (or ``rename[key]``)."""
    wide = long.pivot(index="run_id", columns="key", values="value")
    names = {k: (rename or {}).get(k, prefix + k.removeprefix(strip)) for k in wide.columns}
    wide.columns.name = None
    return wide.rename(columns=names)


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
    if row.get("superseded") == "true":
        return "superseded: `etbench sweep run --force` re-ran its config (tag etbench.superseded)"
    allowed = INCLUDED_STATUSES + (FAILED_STATUSES if include_failed else ())
    if row["status"] not in allowed:
        error = row.get("error")
        detail = f": {error}" if isinstance(error, str) and error else ""
        hint = "" if include_failed or row["status"] not in FAILED_STATUSES else " (include_failed=True keeps it)"
        return f"status {row['status']}{detail}{hint}"
    return None


def runs_frame(runs: list[Run], *, include_failed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Analysed runs, excluded runs (run_id, status, reason) and the axis columns, from MLflow run objects."""
    return frame_from_wide(pd.DataFrame([_row(r) for r in runs]), include_failed=include_failed)


def _exclusion_reasons(frame: pd.DataFrame, include_failed: bool) -> pd.Series:
    """``_exclusion_reason`` of every row; computed row by row only for the (few) rows not analysed."""
    allowed = INCLUDED_STATUSES + (FAILED_STATUSES if include_failed else ())
    fine = (frame["status"].isin(allowed) & frame[list(REQUIRED_TAGS)].notna().all(axis=1)
            & (frame["superseded"] != "true"))
    reasons = pd.Series(None, index=frame.index, dtype=object)
    if (~fine).any():
        reasons[~fine] = frame[~fine].apply(_exclusion_reason, axis=1, args=(include_failed,))
    return reasons


def frame_from_wide(frame: pd.DataFrame, *, include_failed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                   list[str]]:
    """:func:`runs_frame` from the wide frame (one row per run, ``_row``'s columns) of either reader. A grid's
    parent run (tag ``etbench.kind = grid``) is no trial: it is dropped before anything else."""
    if frame.empty:
        frame = pd.DataFrame(columns=[*INFO_COLUMNS, *TAG_COLUMNS])
    if "kind" in frame.columns:
        frame = frame[frame["kind"] != schema.KIND_GRID].reset_index(drop=True)
    reasons = _exclusion_reasons(frame, include_failed) if len(frame) else pd.Series(dtype=object)
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
    frame, duplicates = drop_duplicates(frame, axes)
    if len(duplicates):
        excluded = pd.concat([excluded, duplicates], ignore_index=True)
    axes = [a for a in axes if not _redundant(frame, a)]
    order = ["dataset", "protocol", "model", *axes, "split", "seed"]
    frame = frame.sort_values(order, kind="stable", na_position="last").reset_index(drop=True)
    return frame, excluded, axes


DUPLICATE_REASON = ("duplicate: a newer FINISHED run of the same cell, seed and split is analysed (kept_run_id); "
                    "they differ at most in execution settings")
#: Logged params that tell a graph classification run's outer fold (its ``split`` tag is -1): part of the replicate.
REPLICATE_PARAMS = ("params.task.fold", "params.task.repeat")


def replicate_key(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    """The columns naming one replicate of one grid cell: grid, task, dataset, protocol, model, stage, every axis,
    split, seed (and a graph classification run's fold and repeat)."""
    cols = ["grid", "task", "dataset", "protocol", "model", "stage", *axes, "split", "seed"]
    return [c for c in cols if c in frame.columns] + [c for c in REPLICATE_PARAMS if c in frame.columns]


def _science_columns(frame: pd.DataFrame) -> list[str]:
    execution = {f"params.{k}" for k in EXECUTION_FIELDS}
    return [c for c in frame.columns if c.startswith("params.") and c not in execution]


def _same_science(a: pd.Series, b: pd.Series, science: list[str]) -> bool:
    """Two runs ran the same science: one config hash, or the same logged params but the execution settings."""
    if a["config_hash"] == b["config_hash"] and pd.notna(a["config_hash"]):
        return True
    va, vb = a[science], b[science]
    if va.isna().all() or vb.isna().all():  # no params logged: nothing shows they are the same
        return False
    return bool(((va == vb) | (va.isna() & vb.isna())).all())


def drop_duplicates(frame: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one FINISHED run per replicate (:func:`replicate_key`) — the newest — and return the others as
    exclusions (run_id, status, reason, kept_run_id).

    Duplicates are runs of one science config: the same config hash, or the same logged params except the
    execution settings (``etbench.hashing.EXECUTION_FIELDS``; such runs have two hashes when one was logged before
    those settings left the hash, or a setting changed mid-grid). Runs of one replicate whose science differs —
    an experiment holding two versions of a grid whose base changed without an axis, or runs from outside the
    grid — are no replicates of one another and no seeds either: :class:`AnalysisError` names them and the fields
    that differ. A search's tuning runs (stage ``tune``: one replicate, many searched configurations) are left
    as they are; the report compares final runs only."""
    finished = frame["status"] == "FINISHED"
    if "stage" in frame.columns:
        finished &= frame["stage"] != "tune"
    key = replicate_key(frame, axes)
    candidates = frame[finished]
    repeated = candidates[candidates.duplicated(key, keep=False)]
    empty = pd.DataFrame(columns=["run_id", "status", "reason", "kept_run_id"])
    if repeated.empty:
        return frame, empty
    science = _science_columns(frame)
    dropped: list[dict[str, object]] = []
    conflicts: list[str] = []
    for _, group in repeated.groupby(key, dropna=False, sort=False):
        group = group.sort_values(["start_time", "run_id"], ascending=False, na_position="last")
        newest = group.iloc[0]
        differ = [r for _, r in group.iterrows() if not _same_science(newest, r, science)]
        if differ:
            conflicts.append(_conflict(group, science, key))
            continue
        dropped += [{"run_id": r["run_id"], "status": r["status"], "reason": DUPLICATE_REASON,
                     "kept_run_id": newest["run_id"]} for _, r in group.iloc[1:].iterrows()]
    if conflicts:
        from etbench.analysis import AnalysisError

        shown = "\n".join(f"  - {c}" for c in conflicts[:5])
        more = f"\n  … and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        raise AnalysisError(
            f"{len(conflicts)} replicate(s) (grid cell, seed, split) hold FINISHED runs of different configs, which "
            f"the report would count as extra seeds:\n{shown}{more}\nThe experiment mixes versions of a grid (a "
            f"base value changed without an axis) or runs from outside it. Keep one version: delete the other runs "
            f"in MLflow, tag them etbench.superseded=true, or run each version into its own experiment "
            f"(docs/run_identity.md)")
    out = frame[~frame["run_id"].isin([d["run_id"] for d in dropped])].reset_index(drop=True)
    return out, pd.DataFrame(dropped, columns=empty.columns)


def _conflict(group: pd.DataFrame, science: list[str], key: list[str]) -> str:
    """One line: the replicate, its runs (id: hash) and the science params in which they differ."""
    where = ", ".join(f"{k.removeprefix(AXIS_PREFIX).removeprefix('params.')}={group[k].iloc[0]}" for k in key
                      if pd.notna(group[k].iloc[0]))
    fields = [c.removeprefix("params.") for c in science if group[c].astype(str).nunique(dropna=False) > 1]
    runs = ", ".join(f"{r}: {h}" for r, h in zip(group["run_id"], group["config_hash"], strict=True))
    return f"{where}: runs {runs}; differing params: {', '.join(fields[:8]) or 'none logged'}"


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
    uri = tracking_uri or client.tracking_uri
    exp_id = (_sql_experiment_id(uri, experiment) if is_sql_store(uri) else None) or experiment_id(client, experiment)
    if is_sql_store(uri):
        runs, excluded, axes = frame_from_wide(sql_frame(uri, exp_id), include_failed=include_failed)
    else:
        runs, excluded, axes = runs_frame(search_all(client, exp_id, progress), include_failed=include_failed)
    return RunTable(experiment=experiment, experiment_id=exp_id, runs=runs, excluded=excluded, axes=axes)
