"""Checkpoint retention: which of a run's checkpoints stay on disk (:class:`etbench.config.CheckpointRetention`).

One-process runs write their checkpoints by hand: ``checkpoints/latest/`` is the resume point, rewritten after
every checkpointed epoch and never removed here. A checkpoint that must outlive it — one of the ``keep_best``
best validation epochs, or one of the ``keep_last`` most recent — is kept as ``checkpoints/epoch-NNNN/`` (a hard
link to the file ``latest`` had at that epoch, so keeping the latest epoch costs no disk), and every
``epoch-NNNN/`` no longer kept is deleted. ``checkpoints/retained.json`` says which epoch is which.

Distributed runs' checkpoints go through Ray Train's storage; :func:`ray_checkpoint_config` maps the same
setting onto Ray's ``CheckpointConfig`` (which always keeps the latest checkpoint too), with the score each
reported checkpoint carries from :func:`checkpoint_score`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from etbench.config import CheckpointRetention

EPOCH_PREFIX = "epoch-"
RETAINED_FILE = "retained.json"
SCORE_KEY = "etbench_checkpoint_score"  # higher is better: the selection metric, negated when it is minimised


def checkpoint_score(row: dict[str, Any], metric: str, mode: str) -> float:
    """One epoch's score for "best" (higher is better); -inf when the metric is missing or not finite."""
    value = row.get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return -math.inf
    return -float(value) if mode == "min" else float(value)


def kept_epochs(history: list[dict[str, Any]], saved: list[int], metric: str, mode: str,
                keep: CheckpointRetention) -> tuple[list[int], list[int]]:
    """(the ``keep_last`` most recent, the ``keep_best`` best) of the checkpointed ``saved`` epochs (1-based;
    ``history[e - 1]`` is epoch ``e``'s row). Ties go to the earlier epoch, as the loop's best epoch does."""
    order = sorted(set(saved))
    last = order[-keep.keep_last:]
    ranked = sorted(order, key=lambda e: (-checkpoint_score(history[e - 1], metric, mode), e))
    return last, sorted(ranked[: keep.keep_best])


def _epoch_dir(root: Path, epoch: int) -> Path:
    return root / f"{EPOCH_PREFIX}{epoch:04d}"


def saved_epochs(root: Path) -> list[int]:
    """The epochs kept as ``epoch-NNNN/`` under the checkpoints folder ``root``."""
    out = []
    for d in root.glob(f"{EPOCH_PREFIX}*"):
        tail = d.name[len(EPOCH_PREFIX):]
        if d.is_dir() and tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def _keep_copy(latest: Path, target: Path) -> None:
    """``target/`` with the files of ``latest/``: hard links (no extra disk), copies where links fail."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in latest.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:  # a file system without hard links
            shutil.copy2(f, tmp / f.name)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    shutil.rmtree(path)


def retain(latest: Path, epoch: int, history: list[dict[str, Any]], metric: str, mode: str,
           keep: CheckpointRetention) -> dict[str, Any]:
    """After ``latest/`` was written for ``epoch``: keep it as ``epoch-NNNN/`` if the setting keeps that epoch
    beyond the next checkpoint, delete every ``epoch-NNNN/`` the setting no longer keeps, write retained.json.
    Never touches ``latest/``. Returns what retained.json holds."""
    root = latest.parent
    saved = [e for e in saved_epochs(root) if e <= len(history)] + [epoch]
    last, best = kept_epochs(history, saved, metric, mode, keep)
    wanted = set(last) | set(best)
    if (keep.keep_last > 1 or epoch in best) and not _epoch_dir(root, epoch).exists():
        _keep_copy(latest, _epoch_dir(root, epoch))
    for e in saved_epochs(root):
        if e not in wanted:
            _remove(_epoch_dir(root, e))
    info = {"latest": epoch, "last": last, "best": best, "metric": metric, "mode": mode, **keep.model_dump(),
            "kept": saved_epochs(root)}
    tmp = root / f".{RETAINED_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / RETAINED_FILE)
    return info


def ray_checkpoint_config(keep: CheckpointRetention) -> Any:
    """Ray Train's ``CheckpointConfig`` for the setting: the ``keep_best`` best by :data:`SCORE_KEY` (Ray keeps
    the latest as well), or the ``keep_last`` most recent when no best is kept."""
    import ray.train

    if keep.keep_best > 0:
        return ray.train.CheckpointConfig(num_to_keep=keep.keep_best, checkpoint_score_attribute=SCORE_KEY,
                                          checkpoint_score_order="max")
    return ray.train.CheckpointConfig(num_to_keep=keep.keep_last)
