"""``etbench train image|graph``: one run from flags, a YAML file and ``--set`` pairs, in one process or under Ray
Train + DeepSpeed (``etbench.engine``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _common_arguments(p: argparse.ArgumentParser) -> None:
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


def image_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--root", help="dataset root (mnist, cifar10, imagefolder, imagenet)")
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-eval", type=int)


def graph_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p)
    p.add_argument("--path", help="dataset file")
    p.add_argument("--protocol", choices=["bwgnn", "gadbench"])
    p.add_argument("--train-ratio", type=float)
    p.add_argument("--split", type=int)


def overrides_from_args(a: argparse.Namespace, kind: str) -> dict[str, Any]:
    """CLI flags (and an optional YAML file, then --set key=value pairs) → nested config overrides."""
    import yaml

    from etbench.config import set_dotted

    over: dict[str, Any] = {}
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


def train(a: argparse.Namespace) -> int:
    """One run of ``a.task`` (image or graph); a config, storage or data error reaches ``main``'s error boundary."""
    from etbench.config import resolve_run_config
    from etbench.storage import is_uri, resolve_storage

    cfg = resolve_run_config(overrides_from_args(a, a.task), source=a.config or "command line")
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

        summary = fit(cfg, out, tracking=spec, resume=a.resume, address=a.address, storage_path=storage_path)
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
