"""The single-run training loop: epochs of task batches → backend steps; evaluation; checkpoints; history.

Task-agnostic and placement-agnostic: the caller hands in a :class:`Task` (data, loss, metrics, already sharded for
this worker) and a backend (plain torch or DeepSpeed, already on its device). The same function therefore runs in
one process and inside every Ray Train worker; only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from etbench.engine.backend import Backend, DivergedError, eval_mode


class Task(Protocol):
    """What the loop needs from a task (image completion, graph anomaly detection)."""

    best_metric: str  # e.g. "val/mse_masked"
    best_mode: str  # "min" | "max"
    samples_per_epoch: int  # samples this worker trains on per epoch (for throughput)

    def num_train_batches(self) -> int: ...
    def train_batches(self, epoch: int) -> Iterable[Any]: ...
    def train_loss(self, model: nn.Module, batch: Any) -> Tensor: ...
    def evaluate(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]: ...


EpochCallback = Callable[[int, dict[str, float]], None]


class StopRequested(SystemExit):
    """Raised by an epoch callback when a scheduler (Ray Tune's ASHA) stops the run early: the epochs done so far
    stand and the caller that scheduled it closes the run. A ``SystemExit(0)``, which ends a Tune function
    trainable's thread gracefully; tracking leaves such a run open instead of marking it FAILED."""

    def __init__(self, epoch: int) -> None:
        super().__init__(0)
        self.epoch = epoch  # epochs completed when the stop came


@dataclass
class LoopState:
    """Everything the loop carries across epochs (and checkpoints): history and the best epoch so far."""

    epoch: int = 0  # next epoch to run
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    train_seconds: float = 0.0
    samples_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "history": self.history, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds, "samples_seen": self.samples_seen}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        return cls(int(d["epoch"]), list(d["history"]), int(d["best_epoch"]), float(d["train_seconds"]),
                   int(d["samples_seen"]))

    def best(self) -> dict[str, float]:
        return self.history[self.best_epoch] if self.best_epoch >= 0 else {}


def _better(new: float, old: float, mode: str) -> bool:
    if math.isnan(new):
        return False
    return new < old if mode == "min" else new > old


def train_loop(
    task: Task,
    backend: Backend,
    epochs: int,
    state: LoopState | None = None,
    *,
    checkpoint: Callable[[LoopState], None] | None = None,
    checkpoint_every: int = 1,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    step_probe: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> LoopState:
    """Train from ``state.epoch`` to ``epochs``; evaluate and (optionally) checkpoint after every epoch.

    ``step_probe`` wraps this call's first training step (forward, backward, optimizer step), e.g. to measure its
    peak memory (:class:`etbench.engine.memory.StepMemory`). ``max_steps`` stops after that many micro-batches
    in total (benchmarks). A non-finite loss raises
    :class:`DivergedError` naming the epoch and batch.
    """
    state = state or LoopState()
    model = backend.model
    show = progress and backend.rank == 0
    steps_done = 0
    while state.epoch < epochs:
        epoch = state.epoch
        model.train()
        t0 = time.perf_counter()
        loss_sum, batches = torch.zeros((), dtype=torch.float64), 0
        bar = tqdm(task.train_batches(epoch), total=task.num_train_batches(), disable=not show, leave=False,
                   desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)  # log files get a line every 30 s, not 10/s
        for i, batch in enumerate(bar):
            with step_probe() if step_probe is not None and steps_done == 0 else contextlib.nullcontext():
                with backend.autocast():
                    loss = task.train_loss(model, batch)
                if not torch.isfinite(loss.detach()).all():
                    raise DivergedError(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch + 1}, "
                                        f"batch {i + 1}; lower train.lr or train.alpha, or enable train.grad_clip")
                backend.train_step(loss)
            loss_sum += loss.detach().double().cpu()
            batches += 1
            steps_done += 1
            if show and i % 5 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{backend.lr():.2e}")
            if max_steps is not None and steps_done >= max_steps:
                break
        train_time = time.perf_counter() - t0
        train_loss = float(backend.all_reduce_sum(loss_sum.to(backend.device)).cpu()) / max(1, batches)
        train_loss /= backend.world_size
        with eval_mode(model), torch.no_grad(), backend.autocast():
            metrics = task.evaluate(model, backend.all_reduce_sum)
        state.train_seconds += train_time
        state.samples_seen += task.samples_per_epoch * backend.world_size
        row = {"epoch": float(epoch + 1), "train/loss": train_loss, "lr": backend.lr(),
               "time/epoch_s": train_time, **metrics}
        state.history.append(row)
        key = task.best_metric
        prev = state.history[state.best_epoch][key] if state.best_epoch >= 0 else None
        if key in row and (prev is None or _better(row[key], prev, task.best_mode)
                           or (math.isnan(prev) and not math.isnan(row[key]))):  # a NaN first epoch never sticks
            state.best_epoch = epoch
        state.epoch = epoch + 1
        if on_epoch is not None and backend.rank == 0:
            on_epoch(epoch, row)
        if checkpoint is not None and (state.epoch % checkpoint_every == 0 or state.epoch == epochs):
            checkpoint(state)
        if max_steps is not None and steps_done >= max_steps:
            break
    return state


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints" / "latest"
