"""``etbench sweep plan|run``, ``etbench report`` and ``etbench quickstart``: grids on Ray Tune (``etbench.sweep``)
and their reports (``etbench.analysis.report``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the reference numbers and shipped grids sit beside the package
QUICKSTART_GRIDS = ("quickstart.yaml", "quickstart_graph.yaml")


def plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")


def plan(a: argparse.Namespace) -> int:
    """Every trial of a grid with its estimated cost, and the totals; creates nothing."""
    from etbench.sweep.axes import describe, trial_values
    from etbench.sweep.grid import EFFECTIVE_FLOPS, estimate_cost
    from etbench.sweep.runner import plan as plan_grid

    spec, trials = plan_grid(a.file)
    layout = describe(spec)  # per-model axes, zip groups and derived values, when the grid has any
    if spec.tuning is not None:  # two stages: the search per model, then the final seeds (etbench.sweep.tuning)
        from etbench.sweep.tuning import plan_lines

        print("\n".join(plan_lines(spec, source=a.file) + (["grid layout:", *layout] if layout else [])))
        return 0
    print(f"grid {spec.name}: {len(trials)} trials; resources per trial {spec.resources.model_dump()}; "
          f"max {spec.max_concurrent_trials} concurrent")
    margins = spec.analysis.equivalence_margins
    print(f"checkpoints kept per trial {spec.checkpoints.model_dump()}"
          + (f"; equivalence margins (TOST in the report) {dict(sorted(margins.items()))}" if margins else ""))
    if layout:
        print("\n".join(layout))
    total, cpu_h, gpu_min = 0.0, 0.0, 0.0
    for t in trials:
        c = estimate_cost(t)
        if c["train_pflop"] == c["train_pflop"]:  # not NaN
            rate = EFFECTIVE_FLOPS[t.config.task.kind]
            total += c["train_pflop"]
            cpu_h += c["train_pflop"] * 1e15 / rate["cpu"] / 3600
            gpu_min += c["train_pflop"] * 1e15 / rate["gpu"] / 60
        axes = trial_values(t.axes, t.derived)
        print(f"  {t.config_hash}  {t.model:9s} seed={t.seed}" + (f" split={t.split}" if t.split is not None else "")
              + f"  {axes}  ~{c['train_pflop'] * 1e3:.2f} TFLOP")
    rates = "; ".join(f"{k} {v['cpu'] / 1e9:g} GFLOP/s per CPU trial, {v['gpu'] / 1e12:g} TFLOP/s per GPU"
                      for k, v in EFFECTIVE_FLOPS.items())
    print(f"estimated training compute {total * 1e3:.2f} TFLOP ≈ {cpu_h:.2f} CPU-trial-hours, {gpu_min:.2f} "
          f"GPU-minutes (effective rates: {rates}); nothing was created")
    return 0


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--address", help="Ray address: auto | ray://HOST:10001 (default: a local loopback Ray)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite under --results)")
    p.add_argument("--storage", help="where runs, Ray storage and checkpoints go: a shared path or s3://, gs:// "
                   "URI (default: the grid's storage:, $ETBENCH_STORAGE, ./results)")
    p.add_argument("--results", help="older name of --storage (a directory)")
    p.add_argument("--resume", action="store_true", help="continue interrupted trials from their checkpoints")
    p.add_argument("--force", action="store_true",
                   help="re-run every trial, also FINISHED ones: earlier runs stay in MLflow tagged "
                        "etbench.superseded (left out of reports), earlier folders are moved to <hash>.superseded-*")


def run(a: argparse.Namespace) -> int:
    """Run a grid; exit 1 when trials failed and none finished."""
    from etbench.sweep.runner import run_sweep
    from etbench.tracking.ui import ui_hint

    res = run_sweep(a.file, results_dir=a.results, storage=a.storage, address=a.address,
                    tracking_uri=a.tracking_uri, resume=a.resume, force=a.force)
    print(f"browse the runs: {ui_hint(res.tracking_uri, res.experiment)}")
    return 1 if res.failed and not res.finished else 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri")
    p.add_argument("--results", default="results")
    p.add_argument("--out", required=True)
    p.add_argument("--include-failed", action="store_true")


def report(a: argparse.Namespace) -> int:
    from etbench.analysis.report import make_report
    from etbench.tracking.mlflow_log import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri(Path(a.results))
    refs = REPO / "analysis" / "reference_results.yaml"
    res = make_report(a.experiment, uri, Path(a.out), include_failed=a.include_failed,
                      references=refs if refs.exists() else None)
    print(f"report for {a.experiment!r}: {len(res.tables)} tables, {len(res.figures)} figures → {res.index}")
    _attach_report(a.experiment, uri, Path(a.out))
    return 0


def _attach_report(experiment: str, uri: str, out: Path) -> None:
    """The report as artifacts of the grid's parent run(s) in the store, when there are any (never fails)."""
    from etbench.tracking.grid_run import attach_report

    for run_id in attach_report(experiment, uri, out):
        print(f"report attached to the grid's parent run {run_id} (artifacts report/)")


def quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results")
    p.add_argument("--grid", action="append",
                   help="grid file(s) to run instead of experiments/quickstart.yaml + quickstart_graph.yaml "
                        "(repeatable)")


def quickstart(a: argparse.Namespace) -> int:
    """The shipped quickstart grids (or --grid files), each run and reported; exit 1 when any trial failed."""
    from etbench.analysis.report import make_report
    from etbench.sweep.runner import run_sweep
    from etbench.tracking.ui import ui_hint

    grids = [Path(g) for g in a.grid] if a.grid else [REPO / "experiments" / name for name in QUICKSTART_GRIDS]
    missing = [str(g) for g in grids if not g.is_file()]
    if missing:
        print(f"error: quickstart grid not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    done, failed = [], 0
    for grid in grids:
        res = run_sweep(grid, results_dir=a.results, resume=True)
        out = Path(a.results).resolve() / res.grid / "report"
        done.append((res, out, make_report(res.experiment, res.tracking_uri, out)))
        _attach_report(res.experiment, res.tracking_uri, out)
        failed += len(res.failed)
    print("\nquickstart done:")
    for res, out, rep in done:
        print(f"[{res.grid}]")
        print(f"  MLflow store : {res.tracking_uri} (experiment {res.experiment!r})")
        print(f"  MLflow UI    : {ui_hint(res.tracking_uri, res.experiment)}")
        print(f"  runs         : {res.results_dir / res.grid / 'trials'}")
        print(f"  report       : {rep.index}")
        print(f"  tables       : {out / 'tables'}")
        print(f"  figures      : {out / 'figures'}")
    print("note: the quickstart's learning rate and init are fixed, not tuned per model; for comparisons with an "
          "equal tuning budget per model run experiments/image_tuned_vs_transformers.yaml or "
          "experiments/graph_tuned_vs_gnns.yaml")
    return 0 if not failed else 1
