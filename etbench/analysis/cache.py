"""A local per-run cache of MLflow artifacts and metric histories, so a second report downloads nothing.

Layout: ``<cache_dir>/runs/<run_id>/meta.json`` (status, end_time, the run's root artifact names) beside the
downloaded files and ``history__<metric>.csv`` files. A run's entry is dropped and refetched when its status
or end_time in MLflow differs from the cached one (the run was resumed, re-finished or failed since).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from etbench.tracking import schema

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


class RunCache:
    """Fetch a run's artifacts and metric histories once; serve them from ``cache_dir`` afterwards."""

    def __init__(self, client: MlflowClient, cache_dir: Path) -> None:
        self.client = client
        self.root = Path(cache_dir) / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads = 0

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
        folder, meta = self._dir(run)
        if "artifacts" not in meta:
            meta["artifacts"] = sorted(Path(f.path).name for f in self.client.list_artifacts(str(run["run_id"])))
            self._save_meta(folder, meta)
        return list(meta["artifacts"])  # type: ignore[call-overload]

    def artifact(self, run: Mapping[str, object], name: str) -> Path | None:
        """Local copy of the root artifact ``name`` of ``run``, or None when the run has no such artifact."""
        if name not in self.artifact_names(run):
            return None
        folder, _ = self._dir(run)
        target = folder / "artifacts" / name
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp, _no_progress_bar():
                local = Path(self.client.download_artifacts(str(run["run_id"]), name, tmp))
                self.downloads += 1
                shutil.move(local, target)
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
    return trace


def energy_frame(runs: pd.DataFrame, cache: RunCache, keep: Sequence[str] = ()) -> pd.DataFrame:
    """Energy descent of every run that has one: columns run_id, step, sample, E, E_att, E_hn, dx_norm, source.

    Per-sample values come from the energy_trace.csv artifact; a run without one falls back to its
    ``energy/*`` metric histories (one mean value per descent step, sample = -1, source = "metrics").
    ``keep`` names run columns (e.g. axes, seed) copied onto every row.
    """
    energy_cols = [c for c in (f"metrics.{m}" for m in schema.ENERGY_METRICS) if c in runs.columns]
    frames: list[pd.DataFrame] = []
    for _, run in runs.iterrows():
        has_metrics = bool(energy_cols) and bool(run[energy_cols].notna().any())
        path = cache.artifact(run, schema.ENERGY_TRACE_ARTIFACT) if has_metrics or run["model"] == "et" else None
        if path is not None:
            trace = read_trace(path)[["step", "sample", *ENERGY_TERMS]].assign(source="trace")
        elif has_metrics:
            parts = []
            for key in schema.ENERGY_METRICS:
                if f"metrics.{key}" in runs.columns and pd.notna(run[f"metrics.{key}"]):
                    hist = cache.history(run, key).set_index("step")["value"].rename(key.split("/", 1)[1])
                    parts.append(hist)
            trace = pd.concat(parts, axis=1).reset_index().assign(sample=-1, source="metrics")
            for term in ENERGY_TERMS:
                if term not in trace.columns:
                    trace[term] = float("nan")
        else:
            continue
        trace.insert(0, "run_id", run["run_id"])
        for col in keep:
            trace[col] = run[col]
        frames.append(trace)
    if not frames:
        return pd.DataFrame(columns=["run_id", "step", "sample", *ENERGY_TERMS, "source", *keep])
    return pd.concat(frames, ignore_index=True)
