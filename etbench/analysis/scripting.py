"""Shared plumbing of the researcher's scripts in ``analysis/``: one argument set, loading, saving, printing."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from etbench.analysis import style
from etbench.analysis.cache import RunCache
from etbench.analysis.figures import FigureSet
from etbench.analysis.load import RunTable, client_for, load_runs
from etbench.analysis.metrics import choose_metrics
from etbench.tracking.schema import DEFAULT_EXPERIMENT


@dataclass
class Loaded:
    """What a script works on: the run table, the per-run cache, the output folder and the metric override."""

    table: RunTable
    cache: RunCache
    out: Path
    metric_override: list[str] | None

    def tasks(self) -> list[tuple[str, pd.DataFrame, list[str]]]:
        """(task, its runs, its headline metrics) per task (image / graph), whose metrics differ."""
        runs = self.table.runs
        return [(str(t), g, choose_metrics(g, self.metric_override)) for t, g in runs.groupby("task", sort=True)]


def parser(description: str) -> argparse.ArgumentParser:
    """The common options: experiment, tracking URI, output folder, cache, failed runs, metric override."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (grid) name")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    p.add_argument("--out", type=Path, default=Path("results/analysis"), help="output folder")
    p.add_argument("--cache-dir", type=Path, default=None, help="artifact cache (default: <out>/.etbench-cache)")
    p.add_argument("--include-failed", action="store_true", help="also analyse FAILED / KILLED runs")
    p.add_argument("--metric", action="append", default=None, help="headline metric (repeatable), e.g. "
                   "best/test/psnr; default: the task's logged best/test/* metrics")
    return p


def load(args: argparse.Namespace) -> Loaded:
    """Load the runs named by ``args`` (printing what was found) and choose the metrics."""
    client = client_for(args.tracking_uri)
    table = load_runs(args.experiment, args.tracking_uri, include_failed=args.include_failed, client=client)
    print(f"{len(table.runs)} runs analysed, {len(table.excluded)} left out; axes: {table.axes}")
    if table.runs.empty:
        raise SystemExit(f"no analysable runs in experiment {args.experiment!r}")
    cache = RunCache(client, args.cache_dir or args.out / ".etbench-cache")
    return Loaded(table, cache, Path(args.out), args.metric)


def save_all(made: FigureSet, out: Path) -> list[Path]:
    """Save every figure as PDF + PNG under ``out`` and print what was written and what was skipped."""
    paths: list[Path] = []
    for name, fig in made.made:
        paths += style.save(fig, out / name)
    for p in paths:
        print(f"wrote {p}")
    for s in made.skipped:
        print(f"skipped: {s}")
    return paths

