"""The ``etbench`` command line: a table of subcommands, each one argument builder and one function.

:data:`COMMANDS` is the whole command tree in the order ``etbench --help`` lists it; the builders and handlers live
in this package's small modules (``train``, ``graphcls``, ``sweep``, ``bench``, ``dynamics``, ``inpaint``,
``tracking``), which
import the work itself (torch, Ray, MLflow) only when a handler runs, so ``etbench --help`` stays quick.
:func:`main` is the one error boundary: a user-caused error prints one ``error: …`` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from etbench.cli import bench, dynamics, graphcls, inpaint, sweep, tracking, train

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A subcommand that runs: its name and help line, the function adding its arguments, the one function it calls."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler


@dataclass(frozen=True)
class Group:
    """A subcommand that only holds subcommands (``train``, ``sweep``, ``bench``); ``dest`` names the chosen one."""

    name: str
    help: str
    dest: str
    commands: tuple[Command | Group, ...]


COMMANDS: tuple[Command | Group, ...] = (
    Group("train", "train one run (one process, or --workers N under Ray Train + DeepSpeed)", "task", (
        Command("image", "image task", train.image_arguments, train.train),
        Command("graph", "graph task", train.graph_arguments, train.train),
        Command("graphcls", "graph classification: one fold of a TU dataset (one process)", graphcls.arguments,
                graphcls.train_graphcls),
    )),
    Group("sweep", "ablation grids on Ray Tune", "sweep", (
        Command("plan", "list every trial of a grid and its estimated cost (creates nothing)", sweep.plan_arguments,
                sweep.plan),
        Command("run", "run a grid (skips configs already FINISHED in MLflow)", sweep.run_arguments, sweep.run),
    )),
    Command("report", "tables and figures for one grid (MLflow experiment)", sweep.report_arguments, sweep.report),
    Command("quickstart", "the main demo: the quickstart grid (offline, CPU) and its report",
            sweep.quickstart_arguments, sweep.quickstart),
    Group("bench", "benchmarks (JSON output)", "bench", (
        Command("core", "ET training step: analytic vs autograd gradients (and --peer xla)", bench.core_arguments,
                bench.core),
        Command("image", "ET vs ViT baselines: train/inference throughput, peak memory", bench.image_arguments,
                bench.image),
        Command("zero", "DeepSpeed ZeRO 0-3: per-worker state bytes and throughput vs one process",
                bench.zero_arguments, bench.zero),
        Command("sweep", "sweep overhead per trial, bare TorchTrainer floor, concurrency speed-up",
                bench.sweep_arguments, bench.sweep),
        Command("graph", "graph ET vs GCN/BWGNN epoch time and memory; ET memory vs edges", bench.graph_arguments,
                bench.graph),
        Command("report", "etbench report, dedup lookup and sweep plan on generated stores of N runs",
                bench.report_arguments, bench.report),
        Command("chaos", "plain + tuned grid on a loopback cluster, fault-free vs seeded random faults (root)",
                bench.chaos_arguments, bench.chaos),
    )),
    Command("inpaint", "inpaint a PNG with the authors' released ImageNet ET weights (.npz)", inpaint.arguments,
            inpaint.inpaint),
    Command("dynamics", "re-evaluate a finished ET / vit-tied run at other test-time steps T' and step sizes "
                        "α' = scale·α; writes dynamics.csv and a figure", dynamics.arguments, dynamics.dynamics),
    Group("tracking", "maintenance of an MLflow store", "tracking", (
        Command("rehash", "re-tag runs hashed with their execution settings (retries, CPUs per worker, checkpoint "
                          "cadence) with the science config hash; old hash kept", tracking.rehash_arguments,
                tracking.rehash),
    )),
)


def _add(sub: argparse._SubParsersAction, commands: tuple[Command | Group, ...]) -> None:
    for c in commands:
        p = sub.add_parser(c.name, help=c.help)
        if isinstance(c, Group):
            _add(p.add_subparsers(dest=c.dest, required=True), c.commands)
        else:
            c.arguments(p)
            p.set_defaults(func=c.run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etbench", description="Energy Transformer benchmark suite")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (any position on the line; or set ETBENCH_DEBUG=1)")
    _add(p.add_subparsers(dest="command", required=True), COMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. The error boundary: a user-caused error prints one ``error: …`` line and exits 2; its
    traceback only with ``--debug`` (anywhere on the line) or ``ETBENCH_DEBUG=1``. Bugs keep their traceback."""
    from etbench.errors import user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ETBENCH_DEBUG", "") not in ("", "0")
    # torch_geometric calls torch.jit.script at import: a deprecation only its maintainers can act on
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        err = user_error(exc)
        if err is None:
            raise
        if debug:
            traceback.print_exception(exc)
        print(f"error: {err}", file=sys.stderr)
        return 2
