"""One run on one process: build → (resume) → train loop → artifacts, everything written under ``out``.

Files: config.json (resolved config + hash), metrics.json / metrics.csv (one row per epoch, rewritten each epoch),
energy_trace.csv (ET), reconstruction.png / memories.png (images), summary.json (best-epoch metrics and cost),
checkpoints/latest/ (resume point) and the checkpoints the retention setting keeps beside it
(checkpoints/epoch-NNNN/, checkpoints/retained.json; :mod:`etbench.engine.retention`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from etbench.config import CheckpointRetention, RunConfig
from etbench.engine.backend import PlainBackend, recover_checkpoint
from etbench.engine.build import build_model, build_task, model_cost, resolve_device, seed_everything
from etbench.engine.loop import LoopState, checkpoint_dir, train_loop
from etbench.engine.memory import StepMemory, state_tensors
from etbench.engine.retention import retain
from etbench.errors import EtbenchError
from etbench.models.energy import EnergyTrace
from etbench.tracking.schema import ENERGY_TRACE_ARTIFACT, ENERGY_TRACE_COLUMNS, ENERGY_TRACE_DIAGNOSTICS


class RunExistsError(EtbenchError, RuntimeError):
    """The output directory already holds a run; resume it or choose another directory."""


@dataclass
class RunResult:
    out: Path
    config_hash: str
    state: LoopState
    summary: dict[str, Any]
    trace: EnergyTrace | None


def write_config(cfg: RunConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config_hash": cfg.hash(), "paper_comparable": cfg.paper_comparable,
                                                 "config": cfg.model_dump(mode="json")}, indent=2))


def write_metrics(history: list[dict[str, float]], out: Path) -> None:
    """metrics.json and metrics.csv, each replaced atomically: a trial killed mid-write (a scheduler's stop, a lost
    node) leaves the previous epoch's complete file, never a truncated one that the stage driver cannot read."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    tmp_json, tmp_csv = out / ".metrics.json.tmp", out / ".metrics.csv.tmp"
    tmp_json.write_text(json.dumps(history, indent=2))
    with tmp_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp_csv, out / "metrics.csv")
    os.replace(tmp_json, out / "metrics.json")


def write_trace(trace: EnergyTrace, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*ENERGY_TRACE_COLUMNS, *ENERGY_TRACE_DIAGNOSTICS])
        w.writeheader()
        w.writerows(trace.rows())


TRACE_CURVES = ("E", "E_att", "E_hn", "dx_norm", "grad_norm_mean", "grad_norm_max", "rel_update")


def trace_means(trace: EnergyTrace) -> dict[str, list[float]]:
    """Per-step means over samples, for the ``energy/*`` metrics (diagnostics the trace lacks are left out)."""
    flat = {k: v.reshape(-1, v.shape[-1]) for k in TRACE_CURVES if (v := getattr(trace, k)) is not None}
    return {k: v.mean(0).tolist() for k, v in flat.items()}


def energy_summary(trace: EnergyTrace) -> dict[str, Any]:
    """summary.json's ``energy``: rise fraction, per-step means, and the fixed-point step of the mean relative
    update (None when it never falls below the tolerance)."""
    return {"rise_fraction": trace.rise_fraction(), **trace_means(trace),
            "fixed_point_step": trace.mean_fixed_point_step()}


def finish_run(cfg: RunConfig, task: Any, model: torch.nn.Module, state: LoopState, out: Path,
               device: torch.device, wall_s: float, memory: StepMemory | None = None,
               ) -> tuple[dict[str, Any], EnergyTrace | None]:
    """Rank-0 epilogue: energy trace, images, summary.json.

    ``memory``: the trial's :class:`StepMemory` (peak training-step memory); without one the memory costs are NaN.
    """
    mem = memory.costs() if memory is not None else {"peak_mem_mb": float("nan"), "process_peak_rss_mb": float("nan")}
    trace = task.energy_trace(model, cfg.train.eval_trace_samples)
    if trace is not None:
        write_trace(trace, out / ENERGY_TRACE_ARTIFACT)
    artifacts = [p.name for p in task.write_artifacts(model, out)]
    best = state.best()
    cost = model_cost(model)
    if hasattr(task, "flops_per_sample"):  # graphs: FLOPs per node depend on the graph, so the task knows them
        cost["flops_per_sample"] = float(task.flops_per_sample())
    summary: dict[str, Any] = {
        "config_hash": cfg.hash(),
        "paper_comparable": cfg.paper_comparable,
        "best_epoch": state.best_epoch + 1,
        "best": {k: v for k, v in best.items() if "/" in k},
        "final": state.history[-1] if state.history else {},
        "cost": {**cost, "wall_s": wall_s,
                 "throughput": state.samples_seen / state.train_seconds if state.train_seconds else float("nan"),
                 "samples_seen": float(state.samples_seen), "train_s": float(state.train_seconds),
                 **mem},
        "data": task.describe(),
        "artifacts": artifacts,
    }
    if trace is not None:
        summary["energy"] = energy_summary(trace)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary, trace


def check_out(cfg: RunConfig, out: Path, resume: bool) -> None:
    """Refuse to train into a folder that holds a run, unless resuming that same config. A checkpoint an older
    save left only as ``latest.old`` (killed between its renames) is put back first, so it is resumed, not lost."""
    ckpt = checkpoint_dir(out)
    if recover_checkpoint(ckpt) and not resume:
        raise RunExistsError(f"{out} already holds a run (checkpoint {ckpt}); pass --resume to continue it or "
                             f"choose another --out")
    if resume and (out / "config.json").exists():
        prev = json.loads((out / "config.json").read_text())["config_hash"]
        if prev != cfg.hash():
            raise RunExistsError(f"cannot resume {out}: it holds config {prev}, this config is {cfg.hash()}")


def run_single(
    cfg: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    stop_after_epochs: int | None = None,
    on_start: Callable[[LoopState], None] | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    retention: CheckpointRetention | None = None,
) -> RunResult:
    """Train ``cfg`` on this process; ``stop_after_epochs`` simulates an interruption (tests).

    ``on_start(state)`` sees the state training continues from (resumed or fresh) before the first epoch;
    ``on_checkpoint(state)`` runs after each checkpoint is written (the epochs that a later attempt never trains
    again: :mod:`etbench.engine.tracked` logs epochs to MLflow from here). ``retention``: which checkpoints stay
    on disk besides ``checkpoints/latest`` (default: the best validation epoch's; :mod:`etbench.engine.retention`)."""
    out = Path(out)
    check_out(cfg, out, resume)
    ckpt = checkpoint_dir(out)
    t_start = time.perf_counter()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device, cfg.dist.use_gpu)
    task = build_task(cfg, device)
    model = build_model(cfg, task.describe())
    backend = PlainBackend(model, cfg.train, task.num_train_batches(), device, cfg.dist.grad_accum)
    memory = StepMemory(device, lambda: state_tensors(backend.model, backend.opt))  # per trial, also in a reused actor
    write_config(cfg, out)
    state = LoopState()
    keep = retention or CheckpointRetention()

    def kept(s: LoopState) -> None:  # the checkpoints kept beside latest/ (never latest/ itself)
        retain(ckpt, s.epoch, s.history, task.best_metric, task.best_mode, keep)

    if resume and ckpt.exists():
        state = LoopState.from_dict(backend.load(ckpt))
        if state.epoch > 0:  # an attempt killed between writing latest/ and keeping it: settled now
            kept(state)
        if progress:
            print(f"resumed {out} at epoch {state.epoch}")

    def save(s: LoopState) -> None:
        backend.save(ckpt, s.to_dict())
        kept(s)
        if on_checkpoint is not None:
            on_checkpoint(s)

    def epoch_done(epoch: int, row: dict[str, float]) -> None:
        write_metrics(state.history, out)
        if progress:
            shown = {k: round(v, 5) for k, v in row.items() if k in ("train/loss", "val/loss", "val/mse_masked",
                                                                       "val/psnr", "val/auroc", "val/macro_f1")}
            print(f"epoch {epoch + 1}/{cfg.train.epochs} {shown}", flush=True)
        if on_epoch is not None:
            on_epoch(epoch, row)

    if on_start is not None:
        on_start(state)
    epochs = cfg.train.epochs if stop_after_epochs is None else min(cfg.train.epochs, stop_after_epochs)
    state = train_loop(task, backend, epochs, state, checkpoint=save, checkpoint_every=cfg.train.checkpoint_every,
                       on_epoch=epoch_done, progress=progress, step_probe=memory.measure)
    write_metrics(state.history, out)
    if state.epoch < cfg.train.epochs:
        return RunResult(out, cfg.hash(), state, {}, None)
    summary, trace = finish_run(cfg, task, backend.model, state, out, device, time.perf_counter() - t_start, memory)
    return RunResult(out, cfg.hash(), state, summary, trace)
