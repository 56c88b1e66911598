"""The `etbench` command line. Thin: parse arguments, call into the package, print where results went."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _bench_core(a: argparse.Namespace) -> int:
    from etbench.bench.core import run_core_bench

    rep = run_core_bench(
        Path(a.out), dim=a.dim, heads=a.heads, head_dim=a.head_dim, memories=a.memories, tokens=a.tokens,
        batch=a.batch, steps=a.steps, repeats=a.repeats, device=a.device, peak_gflops=a.peak_gflops,
    )
    print(json.dumps({"results": {m: {k: v for k, v in r.items() if k != "times_s"} for m, r in rep["results"].items()},
                      "ratios": rep["ratios"], "targets": rep["targets"]}, indent=2))
    print(f"wrote {Path(a.out) / 'bench_core.json'}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (JSON output)").add_subparsers(dest="bench", required=True)
    core = bench.add_parser("core", help="ET training step: analytic vs autograd gradients")
    core.add_argument("--out", default="results/bench")
    core.add_argument("--dim", type=int, default=256)
    core.add_argument("--heads", type=int, default=4)
    core.add_argument("--head-dim", type=int, default=64)
    core.add_argument("--memories", type=int, default=1024)
    core.add_argument("--tokens", type=int, default=65)
    core.add_argument("--batch", type=int, default=32)
    core.add_argument("--steps", type=int, default=12)
    core.add_argument("--repeats", type=int, default=5)
    core.add_argument("--device", default="cpu")
    core.add_argument("--peak-gflops", type=float, default=125.0, help="device fp32 peak, for the utilisation figure")
    core.set_defaults(func=_bench_core)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etbench", description="Energy Transformer benchmark suite")
    sub = p.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
