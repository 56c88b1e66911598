"""``etbench dynamics``: re-evaluate a finished ET / vit-tied run (or every FINISHED run of grids) at other test-time
steps and step sizes (``etbench.engine.dynamics``, ``etbench.sweep.dynamics_grid``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def arguments(p: argparse.ArgumentParser) -> None:
    from etbench.tracking.schema import FIXED_POINT_TOL

    p.add_argument("run_dir", nargs="?", help="the run's folder (config.json, metrics.json, checkpoints/)")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32], help="test-time step counts T'")
    p.add_argument("--alpha-scale", type=float, nargs="+", default=[1.0], help="α'/α values (vit-tied: 1 only)")
    p.add_argument("--out", required=True)
    p.add_argument("--tol", type=float, default=FIXED_POINT_TOL,
                   help="relative update ‖Δx‖/‖x‖ below which a step counts as at the fixed point")
    p.add_argument("--device", default="auto", help="auto (the run's train.device) | cpu | cuda")
    p.add_argument("--run-id", help="an MLflow run instead of RUN_DIR; the CSV is logged to it")
    p.add_argument("--tracking-uri", help="the MLflow store of --run-id")
    p.add_argument("--results", help="storage folder of --run-id's grid (default: beside a SQLite store) or of "
                                     "--grid's (default: $ETBENCH_STORAGE, ./results)")
    p.add_argument("--grid", nargs="+", help="probe every FINISHED run of these grid files (skipping runs already "
                                             "in OUT/dynamics_grid.csv) into one combined table")
    p.add_argument("--report", help="with --grid: draw the combined table's figures and tables into this folder")
    p.add_argument("--test-limit", type=int, help="with --grid: probe only the first N test images (cheaper; their "
                                                  "metrics, not the recorded ones)")


def dynamics(a: argparse.Namespace) -> int:
    """One run (RUN_DIR or --run-id), or with --grid every FINISHED run of the grids."""
    from etbench.analysis.dynamics import dynamics_figure
    from etbench.engine import dynamics as dyn

    if a.grid:
        return _grid(a)
    if a.report:
        raise dyn.DynamicsError("--report draws a grid's probes: give --grid GRID [GRID …]")
    if (a.run_dir is None) == (a.run_id is None):
        raise dyn.DynamicsError("give either RUN_DIR or --run-id (with --tracking-uri), not both or neither")
    if a.run_id is not None and not a.tracking_uri:
        raise dyn.DynamicsError("--run-id needs --tracking-uri (the MLflow store the run is in)")
    folder = Path(a.run_dir) if a.run_dir else dyn.run_folder_from_mlflow(
        a.tracking_uri, a.run_id, Path(a.results) if a.results else None)
    run = dyn.load_run(folder, device=a.device)
    rows = dyn.probe(run, a.steps, a.alpha_scale, tol=a.tol)
    out = Path(a.out)
    csv_path = dyn.write_csv(rows, out)
    title = (f"{run.cfg.model.name} · {run.cfg.task.dataset}, trained with T = {run.cfg.model.et.steps}: test-time "
             f"dynamics")
    figures = dynamics_figure(csv_path, out / "dynamics", title=title)
    if a.run_id is not None:
        dyn.log_to_mlflow(a.tracking_uri, a.run_id, [csv_path, *figures])
        print(f"logged dynamics/ to MLflow run {a.run_id}")
    print(f"wrote {csv_path} ({len(rows)} rows) and {figures[-1]}")
    return 0


def _grid(a: argparse.Namespace) -> int:
    from etbench.analysis.dynamics_grid import grid_report
    from etbench.engine import dynamics as dyn
    from etbench.sweep.dynamics_grid import probe_grid

    if a.run_dir is not None or a.run_id is not None:
        raise dyn.DynamicsError("give RUN_DIR / --run-id or --grid, not both")
    results = Path(a.results or os.environ.get("ETBENCH_STORAGE") or "results")
    done = probe_grid(a.grid, results, Path(a.out), a.steps, a.alpha_scale, tol=a.tol, tracking_uri=a.tracking_uri,
                      device=a.device, test_limit=a.test_limit)
    print(f"{len(done.finished)} FINISHED run(s): probed {len(done.probed)}, {len(done.skipped)} already probed; "
          f"{len(done.not_finished)} trial(s) not finished; table {done.csv}")
    if a.report:
        paths = grid_report(done.csv, done.curves, Path(a.report))
        print(f"wrote {len(paths)} report files to {a.report}")
    return 0
