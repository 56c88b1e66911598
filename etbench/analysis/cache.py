"""A local per-run cache of MLflow artifacts and metric histories, so a second report downloads nothing.

Layout: ``<cache_dir>/runs/<run_id>/meta.json`` (status, end_time, the run's root artifact names) beside the
downloaded files and ``history__<metric>.csv`` files. A run's entry is dropped and refetched when its status
or end_time in MLflow differs from the cached one (the run was resumed, re-finished or failed since).

Artifacts of a run whose ``artifact_uri`` is a local folder (``file://``: the default local store) are read in
place — nothing is copied. Others are fetched through the artifact repository of that URI, which (unlike
``MlflowClient.download_artifacts``) needs no run lookup per file. ``energy_frame`` keeps the parsed traces of
all runs in one ``energy.npz`` beside ``runs/``, so a warm report reads one file instead of one per run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from etbench.tracking import schema

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

META = "meta.json"


def _end_time(value: object) -> int | None:
    """end_time as an int (ms) or None for a run that has not ended."""
    return None if value is None or pd.isna(value) else int(value)


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Silence MLflow's per-download tqdm bar (thousands of small files would flood the report's progress)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def local_artifact_dir(artifact_uri: object) -> Path | None:
    """The folder of a ``file://`` (or plain path) artifact URI, None for a remote one or a missing value."""
    if not isinstance(artifact_uri, str) or not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(artifact_uri)
    return None


class RunCache:
    """Fetch a run's artifacts and metric histories once; serve them from ``cache_dir`` afterwards."""

    def __init__(self, client: MlflowClient, cache_dir: Path) -> None:
        self.client = client
        self.cache_dir = Path(cache_dir)
        self.root = self.cache_dir / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads = 0
        self.trace_reads: list[str] = []

    def _local(self, run: Mapping[str, object]) -> Path | None:
        folder = local_artifact_dir(run.get("artifact_uri"))
        return folder if folder is not None and folder.is_dir() else None

    def _repo(self, run: Mapping[str, object]) -> Any:
        """The artifact repository of the run's artifact URI (no run lookup)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = run.get("artifact_uri")
        if not isinstance(uri, str) or not uri:  # a frame without the column: ask MLflow once
            uri = self.client.get_run(str(run["run_id"])).info.artifact_uri
        return get_artifact_repository(uri, tracking_uri=self.client.tracking_uri)

    def _dir(self, run: Mapping[str, object]) -> tuple[Path, dict[str, object]]:
        """The run's cache folder and its meta, emptied first when the run changed in MLflow."""
        run_id = str(run["run_id"])
        folder = self.root / run_id
        want = {"run_id": run_id, "status": run["status"], "end_time": _end_time(run["end_time"])}
        meta_path = folder / META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                return folder, meta
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        meta_path.write_text(json.dumps(want))
        return folder, dict(want)

    def _save_meta(self, folder: Path, meta: dict[str, object]) -> None:
        (folder / META).write_text(json.dumps(meta))

    def artifact_names(self, run: Mapping[str, object]) -> list[str]:
        """Names of the files and folders at the root of the run's artifacts (listed once, then cached)."""
        local = self._local(run)
        if local is not None:
            return sorted(os.listdir(local))
        folder, meta = self._dir(run)
        if "artifacts" not in meta:
            meta["artifacts"] = sorted(Path(f.path).name for f in self._repo(run).list_artifacts())
            self._save_meta(folder, meta)
        return list(meta["artifacts"])  # type: ignore[call-overload]

    def artifact(self, run: Mapping[str, object], name: str) -> Path | None:
        """Local copy of the root artifact ``name`` of ``run``, or None when the run has no such artifact."""
        local = self._local(run)
        if local is not None:
            path = local / name
            return path if path.exists() else None
        if name not in self.artifact_names(run):
            return None
        folder, _ = self._dir(run)
        target = folder / "artifacts" / name
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp, _no_progress_bar():
                fetched = Path(self._repo(run).download_artifacts(name, tmp))
                self.downloads += 1
                shutil.move(fetched, target)
        return target

    def history(self, run: Mapping[str, object], key: str) -> pd.DataFrame:
        """The full history (columns step, value) of metric ``key`` of ``run``."""
        folder, _ = self._dir(run)
        path = folder / f"history__{key.replace('/', '__')}.csv"
        if not path.exists():
            points = self.client.get_metric_history(str(run["run_id"]), key)
            frame = pd.DataFrame({"step": [p.step for p in points], "value": [p.value for p in points]})
            frame.sort_values("step", kind="stable").to_csv(path, index=False)
        return pd.read_csv(path)


ENERGY_TERMS = ("E", "E_att", "E_hn", "dx_norm")


def read_trace(path: Path) -> pd.DataFrame:
    """An energy_trace.csv artifact, checked against the schema's columns."""
    trace = pd.read_csv(path)
    missing = [c for c in schema.ENERGY_TRACE_COLUMNS if c not in trace.columns]
    if missing:
        expected = list(schema.ENERGY_TRACE_COLUMNS)
        raise ValueError(f"{path}: energy trace lacks column(s) {missing}; expected {expected}")
    return _with_diagnostics(trace)


def _with_diagnostics(trace: pd.DataFrame) -> pd.DataFrame:
    """``trace`` with every optional diagnostics column (NaN where a trace predates them)."""
    for c in schema.ENERGY_TRACE_DIAGNOSTICS:
        if c not in trace.columns:
            trace[c] = float("nan")
    return trace


def read_traces(paths: Sequence[tuple[str, Path]]) -> list[pd.DataFrame]:
    """Many (run_id, energy_trace.csv) at once: the files' bodies are joined and parsed by one ``read_csv`` (a
    parser call per small file costs more than its parse); files whose header differs are read one by one."""
    if not paths:
        return []
    bodies: list[bytes] = []
    owners: list[str] = []
    counts: list[int] = []
    header: bytes | None = None
    odd: list[pd.DataFrame] = []
    for run_id, path in paths:
        raw = path.read_bytes()
        head, _, body = raw.partition(b"\n")
        header = head if header is None else header
        if head != header:
            odd.append(read_trace(path)[_TRACE_COLUMNS].assign(source="trace", run_id=run_id))
            continue
        body = body if body.endswith(b"\n") or not body else body + b"\n"
        bodies.append(body)
        owners.append(run_id)
        counts.append(body.count(b"\n"))
    assert header is not None
    names = header.decode().strip().split(",")
    missing = [c for c in schema.ENERGY_TRACE_COLUMNS if c not in names]
    if missing and bodies:
        raise ValueError(f"{paths[0][1]}: energy trace lacks column(s) {missing}; "
                         f"expected {list(schema.ENERGY_TRACE_COLUMNS)}")
    if not bodies:
        return odd
    import io

    table = pd.read_csv(io.BytesIO(b"".join(bodies)), names=names, usecols=[c for c in _TRACE_COLUMNS if c in names])
    table = _with_diagnostics(table)[_TRACE_COLUMNS]
    if len(table) != sum(counts):  # a blank or broken line somewhere: fall back to per-file parsing
        return odd + [read_trace(p)[_TRACE_COLUMNS].assign(source="trace", run_id=r) for r, p in paths
                      if r in set(owners)]
    return [*odd, table.assign(source="trace", run_id=np.repeat(np.array(owners, dtype=object), counts))]


ENERGY_CACHE = "energy.npz"
# rose: 1.0 / 0.0 per (sample, step), NaN when unknown; diagnostics NaN where a trace lacks them
_TRACE_COLUMNS = ["step", "sample", *ENERGY_TERMS, "rose", *schema.ENERGY_TRACE_DIAGNOSTICS]


def _stamp(run: Mapping[str, object]) -> str:
    return f"{run['status']}|{_end_time(run['end_time'])}"


def _load_energy_cache(path: Path) -> tuple[dict[str, str], pd.DataFrame]:
    """(run_id → stamp, rows) of the consolidated trace cache; empty when absent or unreadable."""
    if not path.exists():
        return {}, pd.DataFrame()
    try:
        with np.load(path, allow_pickle=False) as z:
            stamps = json.loads(str(z["stamps"]))
            rows = pd.DataFrame({c: z[c] for c in _TRACE_COLUMNS})
            rows.insert(0, "run_id", z["run_ids"][z["run_code"]].astype(object))
            rows["source"] = np.where(z["from_trace"], "trace", "metrics").astype(object)
    except (OSError, ValueError, KeyError, IndexError):
        return {}, pd.DataFrame()
    return stamps, rows


def _save_energy_cache(path: Path, stamps: dict[str, str], rows: pd.DataFrame) -> None:
    """Write the trace cache atomically (a report killed while writing leaves the old one); run ids are stored
    once each with an int32 code per row."""
    tmp = path.with_name(path.name + ".tmp.npz")
    codes, ids = pd.factorize(rows["run_id"].astype(str))
    arrays = {c: rows[c].to_numpy(dtype=float) for c in _TRACE_COLUMNS}
    np.savez(tmp, stamps=np.array(json.dumps(stamps)), run_ids=np.asarray(ids, dtype=str),
             run_code=codes.astype(np.int32), from_trace=(rows["source"] == "trace").to_numpy(bool), **arrays)
    os.replace(tmp, path)


def _run_trace(run: Mapping[str, object], cache: RunCache, energy_cols: list[str]) -> pd.DataFrame | None:
    """One run's descent rows from its trace artifact, else from its energy/* histories; None without either."""
    has_metrics = any(pd.notna(run[c]) for c in energy_cols)
    path = cache.artifact(run, schema.ENERGY_TRACE_ARTIFACT) if has_metrics or run["model"] == "et" else None
    if path is not None:
        return read_trace(path)[_TRACE_COLUMNS].assign(source="trace")
    if not has_metrics:
        return None
    parts = []
    for key in (*schema.ENERGY_METRICS, *schema.ENERGY_DIAGNOSTICS):
        if f"metrics.{key}" in run and pd.notna(run[f"metrics.{key}"]):
            parts.append(cache.history(run, key).set_index("step")["value"].rename(key.split("/", 1)[1]))
    trace = pd.concat(parts, axis=1).reset_index().assign(sample=-1, source="metrics")
    for term in _TRACE_COLUMNS[2:]:  # per-step means say nothing about which sample rose
        if term not in trace.columns:
            trace[term] = float("nan")
    return trace[[*_TRACE_COLUMNS, "source"]]


def energy_frame(runs: pd.DataFrame, cache: RunCache, keep: Sequence[str] = ()) -> pd.DataFrame:
    """Energy descent of every run that has one: columns run_id, step, sample, E, E_att, E_hn, dx_norm, rose, source.

    Per-sample values come from the energy_trace.csv artifact; a run without one falls back to its
    ``energy/*`` metric histories (one mean value per descent step, sample = -1, source = "metrics").
    ``keep`` names run columns (e.g. axes, seed) copied onto every row. Parsed traces are kept in
    ``<cache_dir>/energy.npz`` per (run, status, end_time); ``cache.trace_reads`` lists the runs read afresh.
    """
    energy_cols = [c for c in (f"metrics.{m}" for m in schema.ENERGY_METRICS) if c in runs.columns]
    path = cache.cache_dir / ENERGY_CACHE
    stamps, cached = _load_energy_cache(path)
    still: set[str] = set()
    cols = [c for c in ["run_id", "status", "end_time", "artifact_uri", "model", *energy_cols] if c in runs.columns]
    frames: list[pd.DataFrame] = []
    fresh: dict[str, str] = {}
    local: list[tuple[str, Path]] = []
    cache.trace_reads = []
    for run in runs[cols].to_dict("records"):
        run_id, stamp = str(run["run_id"]), _stamp(run)
        fresh[run_id] = stamp
        if stamps.get(run_id) == stamp:
            still.add(run_id)
            continue
        cache.trace_reads.append(run_id)
        folder = cache._local(run)
        if folder is not None and (folder / schema.ENERGY_TRACE_ARTIFACT).is_file():
            local.append((run_id, folder / schema.ENERGY_TRACE_ARTIFACT))
            continue
        trace = _run_trace(run, cache, energy_cols)
        if trace is not None:
            frames.append(trace.assign(run_id=run_id))
    if still:
        frames.insert(0, cached[cached["run_id"].isin(still)])
    frames += read_traces(local)
    out_cols = ["run_id", *_TRACE_COLUMNS, "source"]
    rows = pd.concat(frames, ignore_index=True)[out_cols] if frames else pd.DataFrame(columns=out_cols)
    rows["rose"] = _flags(rows["rose"])
    if cache.trace_reads or set(stamps) != set(fresh):
        _save_energy_cache(path, fresh, rows)
    if keep:
        rows = rows.merge(runs[["run_id", *keep]].drop_duplicates("run_id"), on="run_id", how="left")
    for c in ("step", "sample"):
        rows[c] = rows[c].astype(int)
    return rows


def _flags(col: pd.Series) -> np.ndarray:
    """A trace's ``rose`` column (bool, "True"/"False" text, 0/1 or NaN, possibly mixed) as 1.0 / 0.0 / NaN."""
    if col.dtype != object:
        return col.to_numpy(dtype=float)
    low = col.astype(str).str.strip().str.lower()
    num = pd.to_numeric(col.where(~low.isin(["true", "false"])), errors="coerce").to_numpy(dtype=float)
    return np.where(low == "true", 1.0, np.where(low == "false", 0.0, num))
