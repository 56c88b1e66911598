"""The `etbench` command line. Thin: parse arguments, call into the package, print where results went."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _bench_core(a: argparse.Namespace) -> int:
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


def _bench_image(a: argparse.Namespace) -> int:
    from etbench.bench.image import run_image_bench

    rep = run_image_bench(Path(a.out), dataset_preset=a.preset, batch=a.batch, repeats=a.repeats, device=a.device)
    print(json.dumps(rep.get("ratios", rep), indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_image.json'}")
    return 0


def _bench_sweep(a: argparse.Namespace) -> int:
    from etbench.bench.sweep import run_sweep_bench

    rep = run_sweep_bench(Path(a.out), trials=a.trials, cpus=a.cpus, batch=a.batch, floor_repeats=a.floor_repeats,
                          two_worker_trials=a.two_worker_trials, two_worker_cpus=a.two_worker_cpus,
                          speedup_epochs=a.speedup_epochs, speedup_repeats=a.speedup_repeats)
    print(json.dumps({k: rep[k] for k in ("one_worker", "concurrency", "torchtrainer_floor", "two_worker",
                                          "targets") if k in rep}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_sweep.json'}")
    return 0


def _bench_graph(a: argparse.Namespace) -> int:
    from etbench.bench.graph import run_graph_bench

    rep = run_graph_bench(Path(a.out), dataset=a.dataset, path=a.path, repeats=a.repeats, device=a.device)
    print(json.dumps({k: rep[k] for k in ("ratios", "memory_scaling", "targets")}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_graph.json'}")
    return 0


def _bench_zero(a: argparse.Namespace) -> int:
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


def _bench_report(a: argparse.Namespace) -> int:
    from etbench.bench.report import run_report_bench

    rep = run_report_bench(Path(a.out), sizes=tuple(a.sizes), stores=Path(a.stores), legacy_max_runs=a.legacy_max,
                           skip=frozenset(a.skip), server_max_runs=a.server_max)
    print(json.dumps({"targets": rep["targets"], "memory": rep["memory"]}, indent=2, default=str))
    print(f"wrote {Path(a.out) / 'bench_report.json'}")
    return 0


def _inpaint(a: argparse.Namespace) -> int:
    from etbench.interop.official import inpaint_png

    res = inpaint_png(a.npz, a.png, a.out, mask_ratio=a.mask_ratio, seed=a.seed,
                      image_shape=(3, a.image_size, a.image_size), patch_size=a.patch, steps=a.steps,
                      alpha=a.alpha)
    print(f"wrote {res['png_out']} (masked-patch MSE {res['mse_masked']:.4f})")
    return 0


def _add_inpaint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inpaint", help="inpaint a PNG with the authors' released ImageNet ET weights (.npz)")
    p.add_argument("npz")
    p.add_argument("png")
    p.add_argument("out")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--alpha", type=float, default=0.1)
    p.set_defaults(func=_inpaint)


def _dynamics(a: argparse.Namespace) -> int:
    from etbench.analysis.dynamics import dynamics_figure
    from etbench.engine import dynamics as dyn

    if a.grid:
        return _dynamics_grid(a)
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


def _dynamics_grid(a: argparse.Namespace) -> int:
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


def _add_dynamics(sub: argparse._SubParsersAction) -> None:
    from etbench.tracking.schema import FIXED_POINT_TOL

    p = sub.add_parser("dynamics", help="re-evaluate a finished ET / vit-tied run at other test-time steps T' and "
                                        "step sizes α' = scale·α; writes dynamics.csv and a figure")
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
    p.set_defaults(func=_dynamics)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (JSON output)").add_subparsers(dest="bench", required=True)
    core = bench.add_parser("core", help="ET training step: analytic vs autograd gradients (and --peer xla)")
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
    core.add_argument("--peak-gflops", type=float, default=None,
                      help="device fp32 peak (GFLOP/s) for the MFU figures; default: known GPUs' datasheet fp32 peak")
    core.add_argument("--peer", choices=["xla"], default=None,
                      help="also time the same step in JAX/XLA (needs the peers extra), interleaved")
    core.add_argument("--no-profile", action="store_true", help="skip the per-op profile and GEMM-rate probes")
    core.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    core.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the run (default: torch's)")
    core.add_argument("--compile", action="store_true",
                      help="also time the default mode with its forward under torch.compile (about 1 min to compile)")
    core.set_defaults(func=_bench_core)
    img = bench.add_parser("image", help="ET vs ViT baselines: train/inference throughput, peak memory")
    img.add_argument("--out", default="results/bench")
    img.add_argument("--preset", default="cifar10", choices=["digits", "mnist", "cifar10", "imagenet"])
    img.add_argument("--batch", type=int, default=32)
    img.add_argument("--repeats", type=int, default=5)
    img.add_argument("--device", default="cpu")
    img.set_defaults(func=_bench_image)
    zero = bench.add_parser("zero", help="DeepSpeed ZeRO 0-3: per-worker state bytes and throughput vs one process")
    zero.add_argument("--out", default="results/bench")
    zero.add_argument("--world", type=int, default=2)
    zero.add_argument("--stages", type=int, nargs="+", choices=(0, 1, 2, 3), default=[0, 1, 2, 3])
    zero.add_argument("--steps", type=int, default=12)
    zero.add_argument("--warmup", type=int, default=2)
    zero.add_argument("--dataset", default="digits")
    zero.add_argument("--batch", type=int, default=64, help="global batch")
    zero.add_argument("--limit-train", type=int, default=None)
    zero.add_argument("--gpu", action="store_true")
    zero.add_argument("--no-resume-check", action="store_true")
    zero.set_defaults(func=_bench_zero)
    sw = bench.add_parser("sweep", help="sweep overhead per trial, bare TorchTrainer floor, concurrency speed-up")
    sw.add_argument("--out", default="results/bench")
    sw.add_argument("--trials", type=int, default=8, help="trials per sweep (sequential vs concurrency 2)")
    sw.add_argument("--speedup-repeats", type=int, default=3,
                    help="interleaved (sequential, concurrent) pairs; the speed-up is the ratio of their medians")
    sw.add_argument("--speedup-epochs", type=int, default=4,
                    help="epochs (of 1,280 digits) per trial of the speed-up sweeps")
    sw.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray session")
    sw.add_argument("--batch", type=int, default=32, help="batch = training samples: one step per trial")
    sw.add_argument("--floor-repeats", type=int, default=3, help="bare TorchTrainer(num_workers=2).fit() repeats")
    sw.add_argument("--two-worker-trials", type=int, default=4,
                    help="0 skips the Ray Train + DeepSpeed trials; >= 2 gives the steady-state per-trial cost")
    sw.add_argument("--two-worker-cpus", type=float, default=0.45, help="CPUs per Ray Train worker")
    sw.set_defaults(func=_bench_sweep)
    gr = bench.add_parser("graph", help="graph ET vs GCN/BWGNN epoch time and memory; ET memory vs edges")
    gr.add_argument("--out", default="results/bench")
    gr.add_argument("--dataset", default="tolokers")
    gr.add_argument("--path")
    gr.add_argument("--repeats", type=int, default=3)
    gr.add_argument("--device", default="cpu")
    gr.set_defaults(func=_bench_graph)
    rp = bench.add_parser("report", help="etbench report, dedup lookup and sweep plan on generated stores of N runs")
    rp.add_argument("--out", default="results/bench")
    rp.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 30000],
                    help="store sizes (runs); presets: 24 (smoke), 200, 1000, 5000, 30000")
    rp.add_argument("--stores", default="results/bench_report_stores", help="where generated stores are kept")
    rp.add_argument("--legacy-max", type=int, default=5000,
                    help="also time the old search_runs dedup lookup up to this many runs")
    rp.add_argument("--server-max", type=int, default=1000,
                    help="also time the report through an MLflow server on 127.0.0.1 up to this many runs")
    rp.add_argument("--skip", nargs="*", default=[], choices=["cold", "warm", "lookup", "plan", "server"],
                    help="measurements to leave out (e.g. warm plan for a quick 30,000-run figure)")
    rp.set_defaults(func=_bench_report)


def _overrides_from_args(a: argparse.Namespace, kind: str) -> dict:
    """CLI flags (and an optional YAML file, then --set key=value pairs) → nested config overrides."""
    import yaml

    from etbench.config import set_dotted

    over: dict = {}
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise SystemExit(f"error: config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of config sections (task, model, train, dist)")
        over = loaded
    over = set_dotted(over, "task.kind", kind)
    flags = {
        "task.dataset": a.dataset, "model.name": a.model, "model.et.steps": a.steps, "model.et.alpha": a.alpha,
        "model.et.grad_mode": a.grad_mode, "train.epochs": a.epochs, "train.lr": a.lr,
        "train.batch_size": a.batch_size, "train.seed": a.seed, "train.device": a.device,
        "dist.workers": a.workers, "dist.zero_stage": a.zero,
        "dist.deepspeed": True if a.zero is not None else None, "dist.use_gpu": True if a.gpu else None,
    }
    if kind == "image":
        flags.update({"task.root": a.root, "task.limit_train": a.limit_train, "task.limit_eval": a.limit_eval})
    else:
        flags.update({"task.path": a.path, "task.protocol": a.protocol, "task.train_ratio": a.train_ratio,
                      "task.split": a.split})
    for k, v in flags.items():
        if v is not None:
            over = set_dotted(over, k, v)
    for item in a.set or []:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        over = set_dotted(over, k.strip(), yaml.safe_load(v))
    return over


def _train(a: argparse.Namespace) -> int:
    from etbench.config import ConfigError, resolve_run_config

    try:
        cfg = resolve_run_config(_overrides_from_args(a, a.task), source=a.config or "command line")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from etbench.storage import StorageError, is_uri, resolve_storage

    st = resolve_storage(a.storage)
    name = f"{a.task}-{cfg.model.name}-{cfg.hash()}"
    storage_path = st.join("runs", name, "ray") if st.is_uri else None  # a URI holds the Ray Train checkpoints
    out = Path(a.out) if a.out else (Path("results") / "runs" / name if st.is_uri or st.source == "default" else
                                     st.local / "runs" / name)
    if a.out and is_uri(a.out):
        print(f"error: --out {a.out}: give a directory; a URI goes to --storage", file=sys.stderr)
        return 2
    spec = None
    if a.tracking_uri or a.experiment:
        from etbench.engine.tracked import TrackingSpec
        from etbench.tracking.mlflow_log import default_tracking_uri
        from etbench.tracking.schema import DEFAULT_EXPERIMENT

        spec = TrackingSpec(uri=a.tracking_uri or default_tracking_uri(Path("results")),
                            experiment=a.experiment or DEFAULT_EXPERIMENT, grid=a.experiment or DEFAULT_EXPERIMENT,
                            run_name=f"{cfg.model.name}-{cfg.hash()}", artifact_root=str(Path("results/artifacts")))
    print(f"run {cfg.hash()} → {out}" + ("" if cfg.paper_comparable else "  (small preset: not paper-comparable)"))
    if spec is not None or cfg.dist.workers > 1 or cfg.dist.deepspeed:
        from etbench.logs import route_library_logs

        print(f"library logs (Ray, MLflow) → {route_library_logs(out)}")
    if cfg.dist.workers > 1 or cfg.dist.deepspeed:
        from etbench.engine.launch import fit

        try:
            summary = fit(cfg, out, tracking=spec, resume=a.resume, address=a.address, storage_path=storage_path)
        except (StorageError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from etbench.engine.tracked import run_tracked

        summary = run_tracked(cfg, out, spec, resume=a.resume)
    best = {k: round(v, 5) for k, v in summary.get("best", {}).items() if k.startswith(("val/", "test/"))}
    print(f"best epoch {summary.get('best_epoch')}: {best}")
    if "energy" in summary:
        print(f"energy trace rise fraction on the trained model: {summary['energy']['rise_fraction']:.4f}")
    print(f"results in {out}")
    if spec is not None:
        from etbench.tracking.ui import ui_hint

        print(f"browse the run: {ui_hint(spec.uri, spec.experiment)}")
    return 0


def _train_graphcls(a: argparse.Namespace) -> int:
    """One fold of a TU graph classification set (``etbench.engine.graphcls_run.train_fold``)."""
    from etbench.config import ConfigError
    from etbench.data.tudataset import TU_DATASETS
    from etbench.engine.graphcls_run import graphcls_config, train_fold
    from etbench.models import registry
    from etbench.tasks.graphcls_folds import N_FOLDS, PROTOCOLS

    datasets, models, protocols = sorted(TU_DATASETS), registry.names("graphcls"), tuple(PROTOCOLS)
    stored = sorted(k for k, v in TU_DATASETS.items() if v.format == "dgcnn")  # the sets that ship fold indices
    if a.dataset not in datasets:
        raise ConfigError(f"--dataset {a.dataset!r}: allowed {', '.join(datasets)}")
    if a.model not in models:
        raise ConfigError(f"--model {a.model!r}: allowed {', '.join(models)}")
    if a.protocol not in protocols:
        raise ConfigError(f"--protocol {a.protocol!r}: allowed {', '.join(protocols)}")
    if not 0 <= a.fold < N_FOLDS:
        raise ConfigError(f"--fold {a.fold}: must be in 0..{N_FOLDS - 1}")
    if a.repeat < 0 or (a.protocol == "stored" and a.repeat != 0):
        raise ConfigError(f"--repeat {a.repeat}: must be ≥ 0" + (" (0 for stored folds)" if a.protocol == "stored"
                                                                 else ""))
    if a.protocol == "stored" and a.dataset not in stored:
        raise ConfigError(f"--protocol stored: {a.dataset} ships no fold indices (only {', '.join(stored)} do); "
                          f"use cv10")
    over: dict = {"task": {"path": a.path} if a.path else {}, "train": {}}
    for key, val in (("epochs", a.epochs), ("seed", a.seed), ("lr", a.lr), ("batch_size", a.batch_size),
                     ("device", a.device)):
        if val is not None:
            over["train"][key] = val
    cfg = graphcls_config(a.dataset, a.model, fold=a.fold, repeat=a.repeat, protocol=a.protocol, overrides=over)
    out = Path(a.out)
    print(f"run {cfg.hash()} ({a.dataset} {a.protocol} repeat {a.repeat} fold {a.fold}, {a.model}) → {out}")
    res = train_fold(cfg, out, resume=a.resume, progress=True)
    best = {k: round(v, 5) for k, v in res.summary.get("best", {}).items() if k.startswith(("val/", "test/"))}
    print(f"best epoch {res.summary.get('best_epoch')}: {best}")
    print(f"results in {out}")
    return 0


def _add_train_graphcls(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("graphcls", help="graph classification: one fold of a TU dataset (one process)")
    p.add_argument("--dataset", required=True, help="mutag, proteins, nci1, nci109, enzymes, imdb-binary, "
                   "mutagenicity, dd")
    p.add_argument("--model", default="et", help="et | gin | mlp")
    p.add_argument("--protocol", default="cv10", help="cv10 | authors | stored (dd)")
    p.add_argument("--fold", type=int, default=0, help="outer fold 0..9")
    p.add_argument("--repeat", type=int, default=0, help="repetition (fold seed + repeat)")
    p.add_argument("--path", help="the dataset zip or directory (default tudataset/<NAME>.zip under the data root)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, help="output directory of the fold")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_train_graphcls)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train one run (one process, or --workers N under Ray Train + DeepSpeed)")
    tsub = train.add_subparsers(dest="task", required=True)
    for kind in ("image", "graph"):
        p = tsub.add_parser(kind, help=f"{kind} task")
        p.add_argument("--config", help="YAML file with task/model/train/dist sections (overrides)")
        p.add_argument("--dataset")
        p.add_argument("--model")
        p.add_argument("--steps", type=int, help="ET descent steps T (baselines: depth)")
        p.add_argument("--alpha", type=float)
        p.add_argument("--grad-mode", choices=["analytic", "autograd"])
        p.add_argument("--epochs", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--device", choices=["auto", "cpu", "cuda"])
        p.add_argument("--workers", type=int, help="Ray Train workers (DeepSpeed on each)")
        p.add_argument("--zero", type=int, help="DeepSpeed ZeRO stage 0-3 (implies DeepSpeed)")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16")
        p.add_argument("--address", help="Ray address: auto | ray://HOST:10001 (default: start a local Ray)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key, e.g. model.et.terms=attn")
        p.add_argument("--out", help="output directory (default <storage>/runs/<task>-<model>-<hash>)")
        p.add_argument("--storage", help="shared path or s3://, gs:// URI for runs and Ray checkpoints (default "
                       "$ETBENCH_STORAGE, ./results)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under results/)")
        p.add_argument("--experiment", help="MLflow experiment name (enables tracking)")
        if kind == "image":
            p.add_argument("--root", help="dataset root (mnist, cifar10, imagefolder, imagenet)")
            p.add_argument("--limit-train", type=int)
            p.add_argument("--limit-eval", type=int)
        else:
            p.add_argument("--path", help="dataset file")
            p.add_argument("--protocol", choices=["bwgnn", "gadbench"])
            p.add_argument("--train-ratio", type=float)
            p.add_argument("--split", type=int)
        p.set_defaults(func=_train)
    _add_train_graphcls(tsub)


def _sweep_plan(a: argparse.Namespace) -> int:
    from etbench.sweep.axes import describe, trial_values
    from etbench.sweep.grid import EFFECTIVE_FLOPS, GridError, estimate_cost
    from etbench.sweep.runner import plan

    try:
        spec, trials = plan(a.file)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = describe(spec)  # per-model axes, zip groups and derived values, when the grid has any
    if spec.tuning is not None:  # two stages: the search per model, then the final seeds (etbench.sweep.tuning)
        from etbench.sweep.tuning import plan_lines

        print("\n".join(plan_lines(spec, source=a.file) + (["grid layout:", *layout] if layout else [])))
        return 0
    print(f"grid {spec.name}: {len(trials)} trials; resources per trial {spec.resources.model_dump()}; "
          f"max {spec.max_concurrent_trials} concurrent")
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


def _sweep_run(a: argparse.Namespace) -> int:
    from etbench.config import ConfigError
    from etbench.storage import StorageError
    from etbench.sweep.grid import GridError
    from etbench.sweep.runner import SweepError, run_sweep

    try:
        res = run_sweep(a.file, results_dir=a.results, storage=a.storage, address=a.address,
                        tracking_uri=a.tracking_uri, resume=a.resume, force=a.force)
    except (GridError, SweepError, StorageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from etbench.tracking.ui import ui_hint

    print(f"browse the runs: {ui_hint(res.tracking_uri, res.experiment)}")
    return 1 if res.failed and not res.finished else 0


def _report(a: argparse.Namespace) -> int:
    from etbench.analysis.report import make_report
    from etbench.tracking.mlflow_log import default_tracking_uri

    uri = a.tracking_uri or default_tracking_uri(Path(a.results))
    refs = Path(__file__).resolve().parents[1] / "analysis" / "reference_results.yaml"
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


QUICKSTART_GRIDS = ("quickstart.yaml", "quickstart_graph.yaml")


def _quickstart(a: argparse.Namespace) -> int:
    from etbench.analysis.report import make_report
    from etbench.sweep.runner import run_sweep
    from etbench.tracking.ui import ui_hint

    shipped = Path(__file__).resolve().parents[1] / "experiments"
    grids = [Path(g) for g in a.grid] if a.grid else [shipped / name for name in QUICKSTART_GRIDS]
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


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="ablation grids on Ray Tune").add_subparsers(dest="sweep", required=True)
    p = sweep.add_parser("plan", help="list every trial of a grid and its estimated cost (creates nothing)")
    p.add_argument("file")
    p.set_defaults(func=_sweep_plan)
    r = sweep.add_parser("run", help="run a grid (skips configs already FINISHED in MLflow)")
    r.add_argument("file")
    r.add_argument("--address", help="Ray address: auto | ray://HOST:10001 (default: a local loopback Ray)")
    r.add_argument("--tracking-uri", help="MLflow URI (default: sqlite under --results)")
    r.add_argument("--storage", help="where runs, Ray storage and checkpoints go: a shared path or s3://, gs:// "
                   "URI (default: the grid's storage:, $ETBENCH_STORAGE, ./results)")
    r.add_argument("--results", help="older name of --storage (a directory)")
    r.add_argument("--resume", action="store_true", help="continue interrupted trials from their checkpoints")
    r.add_argument("--force", action="store_true",
                   help="re-run every trial, also FINISHED ones: earlier runs stay in MLflow tagged "
                        "etbench.superseded (left out of reports), earlier folders are moved to <hash>.superseded-*")
    r.set_defaults(func=_sweep_run)
    rep = sub.add_parser("report", help="tables and figures for one grid (MLflow experiment)")
    rep.add_argument("--experiment", required=True)
    rep.add_argument("--tracking-uri")
    rep.add_argument("--results", default="results")
    rep.add_argument("--out", required=True)
    rep.add_argument("--include-failed", action="store_true")
    rep.set_defaults(func=_report)
    q = sub.add_parser("quickstart", help="the main demo: the quickstart grid (offline, CPU) and its report")
    q.add_argument("--results", default="results")
    q.add_argument("--grid", action="append",
                   help="grid file(s) to run instead of experiments/quickstart.yaml + quickstart_graph.yaml "
                        "(repeatable)")
    q.set_defaults(func=_quickstart)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etbench", description="Energy Transformer benchmark suite")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (any position on the line; or set ETBENCH_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sweep(sub)
    _add_bench(sub)
    _add_inpaint(sub)
    _add_dynamics(sub)
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


if __name__ == "__main__":
    sys.exit(main())
