"""``etbench dynamics --grid``: the test-time probe of :mod:`etbench.engine.dynamics` over every FINISHED run of one
or more grids, into one combined table.

Each grid's trials are planned from its file (so the config hash, model, training T and seed come from the grid
itself); a trial counts when its MLflow experiment holds a complete FINISHED run with that hash and its folder
``<results>/<grid>/trials/<hash>`` exists. Each such run is probed at every (T', α'/α) (image runs in one descent
per α' by :mod:`etbench.engine.dynamics_prefix`), its per-run
``dynamics.csv`` (and the per-step curve at the longest T', ``dynamics_curve.csv``) logged to its MLflow run under
``dynamics/``, and its rows (with ``test_images``, the number of test images probed: all, or the first
``test_limit``) appended to ``OUT/dynamics_grid.csv`` (and ``OUT/dynamics_grid_curves.csv``), rewritten after every
run. Resumable: a run whose every requested (T', α'/α) row is already in the combined table is skipped (whatever
``test_limit`` it was probed with: a fresh OUT probes again).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from etbench.engine import dynamics as dyn
from etbench.engine.dynamics_prefix import probe_prefix
from etbench.tracking.schema import FIXED_POINT_TOL

GRID_CSV = "dynamics_grid.csv"
CURVES_CSV = "dynamics_grid_curves.csv"
CURVE_ARTIFACT = "dynamics_curve.csv"
HEADLINE = ("test/mse_masked", "test/auroc")  # image, graph
RUN_KEYS = ("grid", "config_hash", "model", "train_steps", "train_alpha", "seed", "test_images")  # first columns


@dataclass(frozen=True)
class GridRun:
    """One FINISHED trial of a grid: where its files are and which MLflow run holds it."""

    grid: str
    config_hash: str
    model: str
    seed: int
    train_steps: int
    train_alpha: float  # NaN for vit-tied (no step size)
    folder: Path
    run_id: str
    tracking_uri: str

    def keys(self) -> dict[str, Any]:
        return {"grid": self.grid, "config_hash": self.config_hash, "model": self.model,
                "train_steps": self.train_steps, "train_alpha": self.train_alpha, "seed": self.seed}


@dataclass
class GridProbe:
    """What one call did: runs found finished, probed now, skipped (already probed) and trials not finished."""

    csv: Path
    curves: Path
    finished: list[GridRun]
    probed: list[str]
    skipped: list[str]
    not_finished: list[str]


def finished_runs(grids: Sequence[str | Path], results: Path, tracking_uri: str | None = None) -> tuple[
        list[GridRun], list[str]]:
    """The FINISHED, probe-able runs of ``grids`` under ``results`` and the hashes of their trials that are not
    (no complete FINISHED run, or no folder)."""
    from etbench.sweep.grid import GridError
    from etbench.sweep.runner import plan, trial_dir
    from etbench.tracking.lookup import runs_by_hash
    from etbench.tracking.mlflow_log import default_tracking_uri

    if not Path(results).is_dir():
        raise dyn.DynamicsError(f"--results {results}: no such folder (the storage folder the grids ran with)")
    found: list[GridRun] = []
    missing: list[str] = []
    for path in grids:
        try:
            spec, trials = plan(path)
        except GridError as e:  # one line: the file, then each invalid key
            raise dyn.DynamicsError(" ".join(line.strip() for line in str(e).splitlines())) from None
        if spec.tuning is not None:
            raise dyn.DynamicsError(f"{path}: a grid with a tuning: section; --grid probes plain grids")
        uri = tracking_uri or spec.tracking.uri or default_tracking_uri(Path(results))
        by_hash = runs_by_hash(uri, spec.tracking.experiment or spec.name)
        for t in trials:
            done = [r for r in by_hash.get(t.config_hash, []) if r.complete]
            folder = trial_dir(Path(results), spec.name, t.config_hash)
            key = (t.config.task.kind, t.model)
            if key not in dyn.PROBED:
                raise dyn.DynamicsError(f"{path}: model {t.model!r} ({t.config.task.kind}) cannot be probed; "
                                        f"etbench dynamics probes the image ET, the graph ET and vit-tied")
            if not done or not folder.is_dir():
                missing.append(t.config_hash)
                continue
            alpha = math.nan if t.model == "vit-tied" else t.config.model.et.alpha
            found.append(GridRun(spec.name, t.config_hash, t.model, t.seed, t.config.model.et.steps, alpha, folder,
                                 done[0].run_id, uri))
    return found, missing


def recorded(run: dyn.LoadedRun) -> dict[str, float]:
    """The run's own headline test metric at its training T on the whole test split (metrics.json), as
    ``recorded_<metric>``: beside a ``test_limit`` probe, the full-split value."""
    name = next((k for k in HEADLINE if k in run.recorded), None)
    return {} if name is None else {f"recorded_{name}": float(run.recorded[name])}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"config_hash": str}) if path.is_file() else pd.DataFrame()


def _write(frame: pd.DataFrame, path: Path) -> None:
    """Replace ``path`` atomically (a kill mid-write leaves the previous table)."""
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` with ``new``'s rows added, replacing the rows of the same (config hash, eval_steps, alpha_scale): a
    run probed again at other T' keeps its earlier rows."""
    if old.empty:
        return new
    if new.empty:
        return old
    key = ["config_hash", "eval_steps", "alpha_scale"]
    fresh = pd.MultiIndex.from_frame(new[key].astype({"eval_steps": int, "alpha_scale": float}))
    stale = pd.MultiIndex.from_frame(old[key].astype({"eval_steps": int, "alpha_scale": float})).isin(fresh)
    return pd.concat([old[~stale], new], ignore_index=True)


def _probed(table: pd.DataFrame, run: GridRun, steps: Sequence[int], scales: Sequence[float]) -> bool:
    if table.empty:
        return False
    mine = table[table["config_hash"] == run.config_hash]
    have = {(int(t), float(s)) for t, s in zip(mine["eval_steps"], mine["alpha_scale"], strict=True)}
    return all((int(t), float(s)) in have for t in steps for s in scales)


def probe_grid(grids: Sequence[str | Path], results: Path, out: Path, steps: Sequence[int],
               scales: Sequence[float], *, tol: float = FIXED_POINT_TOL, tracking_uri: str | None = None,
               device: str = "auto", test_limit: int | None = None, log: bool = True,
               say: Callable[[str], None] = print) -> GridProbe:
    """Probe every FINISHED run of ``grids`` not yet in ``out/dynamics_grid.csv`` (see the module docstring)."""
    if not steps or not scales:
        raise dyn.DynamicsError("give at least one step count (--steps) and one step-size scale (--alpha-scale)")
    if bad := [t for t in steps if t < 0] + [s for s in scales if not s > 0]:
        raise dyn.DynamicsError(f"--steps must be ≥ 0 and --alpha-scale > 0, got {bad}")
    runs, missing = finished_runs(grids, Path(results), tracking_uri)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, curves_path = out / GRID_CSV, out / CURVES_CSV
    table, curves = _read(csv_path), _read(curves_path)
    longest = max(steps)
    done: list[str] = []
    skipped: list[str] = []
    for i, run in enumerate(runs):
        run_scales = [1.0] if run.model == "vit-tied" else list(scales)  # α has no meaning for vit-tied
        if _probed(table, run, steps, run_scales):
            skipped.append(run.config_hash)
            continue
        loaded = dyn.load_run(run.folder, device=device, test_limit=test_limit)
        keys = {**run.keys(), "test_images": len(loaded.task.splits.test), **recorded(loaded)}
        curve: list[dict[str, Any]] = []
        rows = probe_prefix(loaded, steps, run_scales, tol=tol, curves=curve, curve_steps=longest)
        run_out = out / "runs" / run.config_hash
        paths = [dyn.write_csv(rows, run_out), run_out / CURVE_ARTIFACT]
        pd.DataFrame(curve).to_csv(paths[1], index=False)
        if log:
            dyn.log_to_mlflow(run.tracking_uri, run.run_id, paths)
        table = _merge(table, pd.DataFrame([{**keys, **r} for r in rows]))
        curves = _merge(curves, pd.DataFrame([{**keys, **c} for c in curve]))
        _write(table, csv_path)
        _write(curves, curves_path)
        done.append(run.config_hash)
        say(f"[{i + 1}/{len(runs)}] probed {run.grid} {run.config_hash} ({run.model}, T = {run.train_steps}, "
            f"seed {run.seed}): {len(rows)} rows")
    if table.empty:  # nothing finished yet: an empty table with the key columns, so the report can say so
        _write(pd.DataFrame(columns=[*RUN_KEYS, "eval_steps", "alpha_scale"]), csv_path)
        _write(pd.DataFrame(columns=[*RUN_KEYS, "eval_steps", "alpha_scale", "step"]), curves_path)
    return GridProbe(csv_path, curves_path, runs, done, skipped, missing)
