"""Checkpoint atomicity (cluster-2 review, finding 15): a crash during a save never leaves a run without its last
whole checkpoint, and a run whose older save crashed between ``latest`` → ``latest.old`` and ``latest.tmp`` →
``latest`` resumes from ``latest.old`` instead of restarting from zero."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from etbench.config import resolve_run_config
from etbench.engine import backend as B
from etbench.engine.build import build_model, build_task
from etbench.engine.launch import has_started
from etbench.engine.loop import LoopState, checkpoint_dir
from etbench.engine.run import run_single

TINY = {"task": {"dataset": "digits", "limit_train": 64, "limit_eval": 32}, "model": {"et": {"steps": 1}},
        "train": {"epochs": 2, "batch_size": 32, "eval_trace_samples": 2}}


class Crash(Exception):
    pass


def _state(path: Path) -> Any:
    return torch.load(path / "state.pt", weights_only=True)


@pytest.mark.parametrize("crash_at", [0, 1, 2])
def test_a_save_that_crashes_at_any_rename_leaves_a_whole_latest(tmp_path: Path, crash_at: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    latest = tmp_path / "checkpoints" / "latest"
    B.atomic_save(latest, {"epoch": 1})
    kept = tmp_path / "checkpoints" / "epoch-0001"
    kept.mkdir()
    os.link(latest / "state.pt", kept / "state.pt")  # as retention keeps an epoch: a hard link to latest's file
    real, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) - 1 == crash_at:
            raise Crash
        real(src, dst)

    monkeypatch.setattr(B.os, "replace", replace)
    try:
        B.atomic_save(latest, {"epoch": 2})
    except Crash:
        pass
    monkeypatch.setattr(B.os, "replace", real)
    # the old save renamed latest away first: a crash at its second rename left no latest (restart from zero)
    assert latest.is_dir() and _state(latest)["epoch"] in (1, 2)
    assert _state(kept) == {"epoch": 1}  # the kept epoch is never rewritten through its link


def _crash_window(out: Path) -> Path:
    """The disk as an older etbench's save left it when killed between its two renames."""
    latest = checkpoint_dir(out)
    os.replace(latest, latest.with_name("latest.old"))
    tmp = latest.with_name("latest.tmp")
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"half a checkpoint")
    return latest


def test_a_run_killed_between_the_old_renames_resumes_from_latest_old(tmp_path: Path) -> None:
    cfg = resolve_run_config(TINY)
    out = tmp_path / "run"
    run_single(cfg, out, progress=False, stop_after_epochs=1)
    before = _state(checkpoint_dir(out))["model"]
    latest = _crash_window(out)
    assert not latest.exists()
    assert has_started(cfg, out)  # was False: the sweep then re-ran the trial from epoch 0
    assert latest.is_dir() and not latest.with_name("latest.old").exists()
    seen: list[int] = []
    res = run_single(cfg, out, progress=False, resume=True, on_start=lambda s: seen.append(s.epoch))
    assert seen == [1] and len(res.state.history) == 2  # resumed after epoch 1, trained epoch 2 only
    assert not latest.with_name("latest.tmp").exists()
    assert any(not torch.equal(before[k], v) for k, v in _state(latest)["model"].items())


def test_load_falls_back_to_latest_old(tmp_path: Path) -> None:
    cfg = resolve_run_config(TINY)
    out = tmp_path / "run"
    run_single(cfg, out, progress=False, stop_after_epochs=1)
    saved = _state(checkpoint_dir(out))["client"]
    latest = _crash_window(out)
    task = build_task(cfg, torch.device("cpu"))
    backend = B.PlainBackend(build_model(cfg, task.describe()), cfg.train, task.num_train_batches(),
                             torch.device("cpu"))
    client = backend.load(latest)
    assert LoopState.from_dict(client).epoch == 1 and client == saved
    shutil.rmtree(latest)
    with pytest.raises(FileNotFoundError):  # nothing whole left: loading says so
        backend.load(latest)


def test_train_resume_without_the_sweep_resumes_from_latest_old(tmp_path: Path) -> None:
    """`etbench train --resume` goes through run_single's folder check, not has_started: it puts latest.old back
    too (before, it found no checkpoint and trained from epoch 0)."""
    cfg = resolve_run_config(TINY)
    out = tmp_path / "run"
    run_single(cfg, out, progress=False, stop_after_epochs=1)
    _crash_window(out)
    seen: list[int] = []
    res = run_single(cfg, out, progress=False, resume=True, on_start=lambda s: seen.append(s.epoch))
    assert seen == [1] and len(res.state.history) == 2
