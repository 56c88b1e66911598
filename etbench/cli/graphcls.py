"""``etbench train graphcls``: one fold of a TU graph classification set (``etbench.engine.graphcls_run``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def arguments(p: argparse.ArgumentParser) -> None:
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


def _check(a: argparse.Namespace) -> None:
    """Refuse a dataset, model, protocol, fold or repeat the registry and the fold protocols do not know."""
    from etbench.config import ConfigError
    from etbench.data.tudataset import TU_DATASETS
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


def train_graphcls(a: argparse.Namespace) -> int:
    """One fold of a TU graph classification set (``etbench.engine.graphcls_run.train_fold``)."""
    from etbench.engine.graphcls_run import graphcls_config, train_fold

    _check(a)
    over: dict[str, Any] = {"task": {"path": a.path} if a.path else {}, "train": {}}
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
