"""Train one graph classification fold into an output directory (SPEC §5): what ``etbench train graphcls`` calls.

A fold is one ordinary single run (``etbench.engine.run.run_single``) whose task is ``graphcls``: the same files
(config.json, metrics.json/csv with ``train/acc``, ``val/acc``, ``test/acc`` per epoch, summary.json with the
best-``val/acc`` epoch, energy_trace.csv for the ET, checkpoints/). A nested-CV evaluation is one such run per
(repeat, fold), each in its own directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from etbench.config import GraphClsTaskConfig, RunConfig, deep_merge, resolve_run_config
from etbench.engine.run import RunResult, run_single


def graphcls_config(dataset: str, model: str = "et", *, fold: int = 0, repeat: int = 0, protocol: str = "cv10",
                    overrides: dict[str, Any] | None = None) -> RunConfig:
    """The resolved run config of one fold: ``overrides`` (any run-config keys) under the named fields."""
    named = {"task": {"kind": "graphcls", "dataset": dataset, "protocol": protocol, "fold": fold, "repeat": repeat},
             "model": {"name": model}}
    return resolve_run_config(deep_merge(overrides or {}, named), source=f"graphcls {dataset} fold {fold}")


def fold_dir(root: Path, repeat: int, fold: int) -> Path:
    """Where fold ``fold`` of repetition ``repeat`` is written under a cross-validation root."""
    return Path(root) / f"repeat-{repeat}" / f"fold-{fold}"


def train_fold(cfg: RunConfig, out: Path, *, resume: bool = False, progress: bool = False) -> RunResult:
    """Train and evaluate one fold into ``out`` (refuses a non-graphcls config)."""
    if not isinstance(cfg.task, GraphClsTaskConfig):
        raise ValueError(f"train_fold needs a graphcls task config, got task.kind {cfg.task.kind!r}")
    return run_single(cfg, Path(out), resume=resume, progress=progress)
