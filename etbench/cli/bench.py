"""``etbench bench …``: one argument builder and one handler per benchmark; each handler runs the benchmark module's
``run_*`` function (imported when called: torch and Ray load only for the benchmark asked for) and prints its gist."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def core_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--memories", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=65)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-gflops", type=float, default=None,
                   help="device fp32 peak (GFLOP/s) for the MFU figures; default: known GPUs' datasheet fp32 peak")
    p.add_argument("--peer", choices=["xla"], default=None,
                   help="also time the same step in JAX/XLA (needs the peers extra), interleaved")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op profile and GEMM-rate probes")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the run (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="also time the default mode with its forward under torch.compile (about 1 min to compile)")


def core(a: argparse.Namespace) -> int:
    from etbench.bench.core import run_core

    rep = run_core(
        Path(a.out), device=a.device, peer=a.peer, dim=a.dim, heads=a.heads, head_dim=a.head_dim,
        memories=a.memories, tokens=a.tokens, batch=a.batch, steps=a.steps, repeats=a.repeats,
        peak_gflops=a.peak_gflops, profile=not a.no_profile, measure_memory=not a.no_memory, threads=a.threads,
        compile=a.compile,
    )
    print(json.dumps({"results": {m: {k: v for k, v in r.items() if k != "times_s"} for m, r in rep["results"].items()},
                      "ratios": rep["ratios"], "targets": rep["targets"], "load_average": rep["load_average"]},
                     indent=2))
    print(f"wrote {Path(a.out) / 'bench_core.json'}")
    return 0


def image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--preset", default="cifar10", choices=["digits", "mnist", "cifar10", "imagenet"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")


def image(a: argparse.Namespace) -> int:
    from etbench.bench.image import run_image_bench

    rep = run_image_bench(Path(a.out), dataset_preset=a.preset, batch=a.batch, repeats=a.repeats, device=a.device)
    print(json.dumps(rep.get("ratios", rep), indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_image.json'}")
    return 0


def zero_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", choices=(0, 1, 2, 3), default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--no-resume-check", action="store_true")


def zero(a: argparse.Namespace) -> int:
    from etbench.bench.zero import run_zero_bench

    over = {"task": {"dataset": a.dataset, "limit_train": a.limit_train}, "train": {"batch_size": a.batch}}
    rep = run_zero_bench(Path(a.out), world=a.world, stages=tuple(a.stages), steps=a.steps, warmup=a.warmup,
                         overrides=over, check_resume=not a.no_resume_check, use_gpu=a.gpu)
    print(json.dumps({"single_images_per_s": rep["single"]["images_per_s"],
                      "stages": {s: {k: r[k] for k in ("per_worker_bytes", "images_per_s", "throughput_vs_single",
                                                      "resume_exact") if k in r} for s, r in rep["stages"].items()},
                      "state_ratio_vs_zero0": rep["state_ratio_vs_zero0"]}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_zero.json'}")
    return 0


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--trials", type=int, default=8, help="trials per sweep (sequential vs concurrency 2)")
    p.add_argument("--speedup-repeats", type=int, default=3,
                   help="interleaved (sequential, concurrent) pairs; the speed-up is the ratio of their medians")
    p.add_argument("--speedup-epochs", type=int, default=4,
                   help="epochs (of 1,280 digits) per trial of the speed-up sweeps")
    p.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray session")
    p.add_argument("--batch", type=int, default=32, help="batch = training samples: one step per trial")
    p.add_argument("--floor-repeats", type=int, default=3, help="bare TorchTrainer(num_workers=2).fit() repeats")
    p.add_argument("--two-worker-trials", type=int, default=4,
                   help="0 skips the Ray Train + DeepSpeed trials; >= 2 gives the steady-state per-trial cost")
    p.add_argument("--two-worker-cpus", type=float, default=0.45, help="CPUs per Ray Train worker")


def sweep(a: argparse.Namespace) -> int:
    from etbench.bench.sweep import run_sweep_bench

    rep = run_sweep_bench(Path(a.out), trials=a.trials, cpus=a.cpus, batch=a.batch, floor_repeats=a.floor_repeats,
                          two_worker_trials=a.two_worker_trials, two_worker_cpus=a.two_worker_cpus,
                          speedup_epochs=a.speedup_epochs, speedup_repeats=a.speedup_repeats)
    print(json.dumps({k: rep[k] for k in ("one_worker", "concurrency", "torchtrainer_floor", "two_worker",
                                          "targets") if k in rep}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_sweep.json'}")
    return 0


def chaos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--trials", type=int, default=52, help="trials of the plain grid (steps 1-4 x seeds)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per trial (a checkpoint after each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--blackhole-s", type=float, default=90, help="seconds the tracking server is black-holed")
    p.add_argument("--mean-gap-s", type=float, default=20, help="mean seconds between faults (exponential)")
    p.add_argument("--configurations", type=int, default=4, help="configurations per search of the tuned grid")
    p.add_argument("--no-tuned", action="store_true", help="the plain grid only")


def chaos(a: argparse.Namespace) -> int:
    from etbench.bench.chaos import run_chaos_bench

    rep = run_chaos_bench(Path(a.out), trials=a.trials, epochs=a.epochs, seed=a.seed, blackhole_s=a.blackhole_s,
                          mean_gap_s=a.mean_gap_s, tuned=not a.no_tuned, configurations=a.configurations)
    print(json.dumps(rep["summary"], indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_chaos.json'}")
    plain = rep["summary"].get("plain", {})
    return 0 if not (plain.get("runs_lost") or plain.get("runs_duplicated") or plain.get("runs_left_live")) else 1


def graph_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--dataset", default="tolokers")
    p.add_argument("--path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")


def graph(a: argparse.Namespace) -> int:
    from etbench.bench.graph import run_graph_bench

    rep = run_graph_bench(Path(a.out), dataset=a.dataset, path=a.path, repeats=a.repeats, device=a.device)
    print(json.dumps({k: rep[k] for k in ("ratios", "memory_scaling", "targets")}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_graph.json'}")
    return 0


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/bench")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 30000],
                   help="store sizes (runs); presets: 24 (smoke), 200, 1000, 5000, 30000")
    p.add_argument("--stores", default="results/bench_report_stores", help="where generated stores are kept")
    p.add_argument("--legacy-max", type=int, default=5000,
                   help="also time the old search_runs dedup lookup up to this many runs")
    p.add_argument("--server-max", type=int, default=1000,
                   help="also time the report through an MLflow server on 127.0.0.1 up to this many runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["cold", "warm", "lookup", "plan", "server"],
                   help="measurements to leave out (e.g. warm plan for a quick 30,000-run figure)")


def report(a: argparse.Namespace) -> int:
    from etbench.bench.report import run_report_bench

    rep = run_report_bench(Path(a.out), sizes=tuple(a.sizes), stores=Path(a.stores), legacy_max_runs=a.legacy_max,
                           skip=frozenset(a.skip), server_max_runs=a.server_max)
    print(json.dumps({"targets": rep["targets"], "memory": rep["memory"]}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_report.json'}")
    return 0
