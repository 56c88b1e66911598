"""Checkpoint retention (issue 28.5): which checkpoints stay on disk, validated on load, never the one ``--resume``
needs — a run SIGKILLed mid-epoch and resumed ends bit-identical to an uninterrupted one, with old checkpoints
deleted along the way."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from etbench.config import CheckpointRetention, resolve_run_config
from etbench.engine import retention as R
from etbench.sweep.grid import GridError, expand, load_grid

NAN = float("nan")


def rows(values: list[float], key: str = "val/mse_masked") -> list[dict[str, float]]:
    return [{"epoch": float(i + 1), key: v} for i, v in enumerate(values)]


# --- which epochs are kept ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "mode", "keep", "last", "best"), [
    ([0.5, 0.3, 0.4, NAN, 0.3], "min", (1, 1), [5], [2]),  # a tie goes to the earlier epoch; NaN is never best
    ([0.5, 0.3, 0.4, NAN, 0.3], "min", (1, 2), [5], [2, 5]),
    ([0.5, 0.3, 0.4, NAN, 0.3], "min", (3, 0), [3, 4, 5], []),
    ([0.5, 0.3, 0.4, NAN, 0.3], "max", (1, 1), [5], [1]),
    ([NAN, NAN], "min", (1, 1), [2], [1]),
])
def test_kept_epochs_by_recency_and_by_metric(values: list[float], mode: str, keep: tuple[int, int],
                                             last: list[int], best: list[int]) -> None:
    setting = CheckpointRetention(keep_last=keep[0], keep_best=keep[1])
    got = R.kept_epochs(rows(values), list(range(1, len(values) + 1)), "val/mse_masked", mode, setting)
    assert got == (last, best)


def test_scores_rank_higher_as_better() -> None:
    assert R.checkpoint_score({"m": 0.2}, "m", "min") == -0.2 and R.checkpoint_score({"m": 0.2}, "m", "max") == 0.2
    assert R.checkpoint_score({"m": NAN}, "m", "min") == -math.inf == R.checkpoint_score({}, "m", "max")


def _write_latest(ckpt: Path, tag: str) -> None:  # as atomic_save does: a new directory replaces the old one
    tmp = ckpt.with_name("latest.tmp")
    tmp.mkdir(parents=True)
    (tmp / "state.pt").write_text(tag)
    old = ckpt.with_name("latest.old")
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    if old.exists():
        (old / "state.pt").unlink()
        old.rmdir()


def test_retain_keeps_the_best_beside_latest_and_deletes_the_rest(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "latest"
    history = rows([0.5, 0.3, 0.4, 0.2, 0.6])
    kept_after = []
    for e in range(1, 6):
        _write_latest(ckpt, f"epoch {e}")
        info = R.retain(ckpt, e, history[:e], "val/mse_masked", "min", CheckpointRetention())
        kept_after.append(R.saved_epochs(ckpt.parent))
        assert (ckpt / "state.pt").read_text() == f"epoch {e}" and info["kept"] == kept_after[-1]
    assert kept_after == [[1], [2], [2], [4], [4]]  # epoch 1 and 2 were kept, then deleted for a better one
    assert (ckpt.parent / "epoch-0004" / "state.pt").read_text() == "epoch 4"  # the file latest had at epoch 4
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["epoch-0004", "latest", "retained.json"]
    info = json.loads((ckpt.parent / "retained.json").read_text())
    assert (info["latest"], info["best"], info["last"], info["kept"]) == (5, [4], [5], [4])


def test_retain_by_recency_and_a_kept_latest_costs_no_disk(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "latest"
    history = rows([0.5, 0.3, 0.4, 0.2])
    for e in range(1, 5):
        _write_latest(ckpt, f"epoch {e}")
        R.retain(ckpt, e, history[:e], "val/mse_masked", "min", CheckpointRetention(keep_last=2, keep_best=0))
    assert R.saved_epochs(ckpt.parent) == [3, 4]
    assert (ckpt.parent / "epoch-0003" / "state.pt").read_text() == "epoch 3"
    assert (ckpt / "state.pt").stat().st_ino == (ckpt.parent / "epoch-0004" / "state.pt").stat().st_ino  # a link
    for e in range(5, 7):  # keep only the latest: every other checkpoint goes
        _write_latest(ckpt, f"epoch {e}")
        R.retain(ckpt, e, rows([0.5, 0.3, 0.4, 0.2, 0.1, 0.1])[:e], "val/mse_masked", "min",
                 CheckpointRetention(keep_last=1, keep_best=0))
    assert R.saved_epochs(ckpt.parent) == [] and (ckpt / "state.pt").read_text() == "epoch 6"


def test_ray_train_gets_the_same_setting() -> None:
    c = R.ray_checkpoint_config(CheckpointRetention())
    assert (c.num_to_keep, c.checkpoint_score_attribute, c.checkpoint_score_order) == (1, R.SCORE_KEY, "max")
    c = R.ray_checkpoint_config(CheckpointRetention(keep_last=3, keep_best=0))
    assert (c.num_to_keep, c.checkpoint_score_attribute) == (3, None)


# --- the grid setting -----------------------------------------------------------------------------------------------
BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
        "train": {"epochs": 1, "batch_size": 16}}


def write(tmp: Path, name: str = "g", **over: Any) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": BASE, "seeds": [0], **over}, sort_keys=False))
    return path


@pytest.mark.parametrize(("checkpoints", "where", "why"), [
    ({"keep_last": 0}, "checkpoints.keep_last", "greater than or equal to 1"),
    ({"keep_best": -1}, "checkpoints.keep_best", "greater than or equal to 0"),
    ({"keep_last": 2, "keep_best": 1}, "checkpoints", "keep_last: N, keep_best: 0"),
    ({"keep": 3}, "checkpoints.keep", "Extra inputs are not permitted"),
])
def test_bad_settings_are_refused_on_load(tmp_path: Path, checkpoints: dict, where: str, why: str) -> None:
    path = write(tmp_path, checkpoints=checkpoints)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert str(path) in str(err.value) and f"{where}: " in str(err.value) and why in str(err.value)


def test_the_setting_reaches_the_trial_and_leaves_hashes_alone(tmp_path: Path) -> None:
    from etbench.sweep.runner import _trial_payload

    default = load_grid(write(tmp_path, "a"))
    lean = load_grid(write(tmp_path, "b", checkpoints={"keep_last": 1, "keep_best": 0}))
    assert default.checkpoints == CheckpointRetention(keep_last=1, keep_best=1)
    assert [t.config_hash for t in expand(lean)] == [t.config_hash for t in expand(default)]
    p = _trial_payload(expand(lean)[0], lean, "sqlite:///x.db", "b", tmp_path / "r", False, None)
    assert CheckpointRetention.model_validate(p["checkpoints"]) == lean.checkpoints


# --- killed mid-run, resumed: bit-identical, with retention active ------------------------------------------------
TINY = {"task": {"dataset": "digits", "limit_train": 96, "limit_eval": 32}, "model": {"et": {"steps": 2}},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5, "eval_trace_samples": 2}}
KILL_EPOCH = 2  # 0-based: SIGKILL in the 3rd epoch, after its second batch (two checkpoints written)

KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from etbench.config import resolve_run_config
    from etbench.engine.run import run_single
    from etbench.tasks.image_task import ImageTask

    real = ImageTask.train_batches

    def batches(self, epoch):
        for i, batch in enumerate(real(self, epoch)):
            if epoch == int(sys.argv[3]) and i == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch: two optimiser steps of this epoch are lost
            yield batch

    ImageTask.train_batches = batches
    run_single(resolve_run_config(json.loads(sys.argv[1])), sys.argv[2], progress=False)
""")


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"]


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _prefix_bests(history: list[dict[str, float]], key: str) -> list[int]:
    """Epochs (1-based) that were the best so far when checkpointed: each was kept at its time."""
    out, best = [], math.inf
    for i, r in enumerate(history):
        if r[key] < best:
            best = r[key]
            out.append(i + 1)
    return out


@pytest.mark.slow  # a second process (SIGKILLed) and three short runs: ~15 s on a quiet core
def test_killed_run_resumes_bit_identically_and_old_checkpoints_are_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etbench.engine.run import run_single

    cfg = resolve_run_config(TINY)
    removed: list[str] = []
    real_remove = R._remove
    monkeypatch.setattr(R, "_remove", lambda p: (removed.append(p.name), real_remove(p)))
    full = run_single(cfg, tmp_path / "full", progress=False)  # default retention: latest + best
    assert removed, "retention deleted no checkpoint in a run whose best epoch moved"
    assert not any((tmp_path / "full" / "checkpoints" / n).exists() for n in removed)

    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(TINY), str(cut), str(KILL_EPOCH)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (cut / "summary.json").exists()
    ckpts = cut / "checkpoints"
    seen = json.loads((cut / "metrics.json").read_text())
    assert len(seen) == KILL_EPOCH  # the epochs checkpointed before the kill
    best_so_far = _prefix_bests(seen, "val/mse_masked")
    best = min(range(1, KILL_EPOCH + 1), key=lambda e: (seen[e - 1]["val/mse_masked"], e))
    assert R.saved_epochs(ckpts) == [best] and len(best_so_far) > 1  # earlier bests were kept, then deleted
    assert (ckpts / "latest" / "state.pt").is_file()  # what --resume needs

    resumed = run_single(cfg, cut, progress=False, resume=True)
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in resumed.state.history]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in full.state.history]
    assert {k: v for k, v in resumed.summary["best"].items() if not k.startswith("time/")} == {
        k: v for k, v in full.summary["best"].items() if not k.startswith("time/")}
    assert resumed.state.best_epoch == full.state.best_epoch
    assert _same_tensors(_model(ckpts / "latest"), _model(tmp_path / "full" / "checkpoints" / "latest"))
    kept = R.saved_epochs(ckpts)
    assert kept == R.saved_epochs(tmp_path / "full" / "checkpoints") == [full.state.best_epoch + 1]
    assert _same_tensors(_model(ckpts / f"epoch-{kept[0]:04d}"),
                         _model(tmp_path / "full" / "checkpoints" / f"epoch-{kept[0]:04d}"))
