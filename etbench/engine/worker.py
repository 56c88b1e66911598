"""The function every Ray Train worker runs: one DeepSpeed rank of one run.

Build the worker's data shard and the model → DeepSpeed engine → resume from Ray's latest checkpoint (if any) →
:func:`~etbench.engine.loop.train_loop`, with a DeepSpeed checkpoint reported through ``ray.train.report`` every
``train.checkpoint_every`` epochs (all ranks save their shards; Ray merges them into one checkpoint directory) →
rank-0 epilogue (metrics, energy trace, images, summary.json, MLflow). The final checkpoint is reported after
the epilogue with the summary in its metrics (``summary_json``): Ray Train V2's ``Result.metrics`` are those of
the latest checkpoint.

MLflow is a sink on rank 0 (:mod:`etbench.tracking.outage`): an unreachable server never stops the ranks; its
epochs wait and go out later. When it stays away past the end-of-run wait, the final checkpoint is still reported
(a restart resumes after the last epoch) before the :class:`~etbench.tracking.outage.TrackingPendingError` ends the
attempt: results complete on disk, FINISHED pending in ``tracking.json``.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from etbench.config import RunConfig
from etbench.engine.build import build_model, build_task, seed_everything
from etbench.engine.loop import LoopState, train_loop
from etbench.engine.memory import StepMemory, state_tensors
from etbench.engine.provenance import nodes_spanned, precision, run_tags, trains_bf16
from etbench.engine.retention import SCORE_KEY, checkpoint_score
from etbench.engine.run import finish_run, write_metrics
from etbench.engine.tracked import TrackingSpec, end_tracking
from etbench.tracking.outage import TrackingPendingError

SUMMARY_KEY = "summary_json"
EPOCH_REPORT_KEY = "etbench_epoch_report"  # a per-epoch report of a tuning trial (etbench.engine.tune_bridge)
SHOWN = ("train/loss", "val/loss", "val/mse_masked", "val/psnr", "val/auroc", "val/macro_f1")


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank ``rank`` SIGKILLs itself after its first batch of epoch ``epoch`` (0-based), once.

    ``marker`` is a file created just before the kill; while it exists the fault does not fire again, so the
    restarted worker group runs through.
    """

    epoch: int
    rank: int
    marker: str


class _FaultyTask:
    """Delegates to a task; kills this process mid-epoch as described by a :class:`FaultInjection`."""

    def __init__(self, task: Any, fault: FaultInjection, rank: int) -> None:
        self._task, self._fault, self._rank = task, fault, rank

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def train_batches(self, epoch: int) -> Iterator[Any]:
        for i, batch in enumerate(self._task.train_batches(epoch)):
            yield batch
            f = self._fault
            if i == 0 and epoch == f.epoch and self._rank == f.rank and not Path(f.marker).exists():
                import ray.train

                # the previous epoch's checkpoint must be committed before we die, or there is nothing to resume
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                                       timeout_s=120)
                Path(f.marker).write_text(f"killed rank {self._rank} in epoch {epoch}\n")
                os.kill(os.getpid(), signal.SIGKILL)


def _device(cfg: RunConfig) -> torch.device:
    if not cfg.dist.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float)}


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the run's TorchTrainer; ``config`` comes from :func:`etbench.engine.launch.fit`."""
    import ray.train

    from etbench.engine.ds_backend import DeepSpeedBackend

    t_start = time.perf_counter()
    cfg = RunConfig.model_validate(config["cfg"])
    out = Path(config["out"])
    spec: TrackingSpec | None = config.get("tracking")
    fault: FaultInjection | None = config.get("fault")
    progress = bool(config.get("progress", True))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    phases: dict[str, float] = {"worker_start_unix": time.time()}
    # rank 0 opens its MLflow store (engine creation + schema check, ~1 s on SQLite) while data and DeepSpeed load
    pool = ThreadPoolExecutor(1, thread_name_prefix="etbench-mlflow")
    attached: Future[Any] | None = (pool.submit(_attached_tracker, spec)
                                    if rank == 0 and spec is not None and spec.run_id else None)
    device = _device(cfg)
    dtype = torch.bfloat16 if trains_bf16(cfg.train, device.type) else torch.float32  # DeepSpeed's bf16 inputs
    seed_everything(cfg.train.seed)
    task = build_task(cfg, device, rank, world, dtype)
    data = task.describe()

    def factory() -> torch.nn.Module:
        return build_model(cfg, data)

    phases["data_s"] = time.perf_counter() - t_start
    backend = DeepSpeedBackend(factory(), cfg, task.num_train_batches(), device, getattr(task, "micro_batch", 1),
                               model_factory=factory)
    phases["deepspeed_init_s"] = time.perf_counter() - t_start - phases["data_s"]
    spanned = nodes_spanned()  # a collective: every rank
    # rank 0's code, node, device and the regime DeepSpeed trains in (its bf16 decision), tagged on the same thread
    tags = run_tags(device, precision(backend.bf16, deepspeed=True), spanned) if rank == 0 else {}
    pending_tracker = pool.submit(_tagged, attached, tags) if attached is not None else None
    pool.shutdown(wait=False)
    state, resumed_from = LoopState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = LoopState.from_dict(backend.load(Path(d))["loop"])
        resumed_from = state.epoch
        if rank == 0 and progress:
            print(f"[etbench] resumed from checkpoint at epoch {state.epoch}", flush=True)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:  # rank 0 only
        write_metrics(state.history, out)
        tracker = pending_tracker.result() if pending_tracker is not None else None
        if tracker is not None:
            tracker.log_epoch(epoch, row)
        if progress:
            shown = {k: round(v, 5) for k, v in row.items() if k in SHOWN}
            print(f"epoch {epoch + 1}/{cfg.train.epochs} {shown}", flush=True)

    def report(s: LoopState, extra: dict[str, Any]) -> None:  # every rank: DeepSpeed shards → one Ray checkpoint
        with tempfile.TemporaryDirectory(prefix="etbench-ckpt-") as tmp:
            backend.save(Path(tmp), {"loop": s.to_dict()})
            row = s.history[-1] if s.history else {}  # the score ranks it for retention (CheckpointConfig)
            metrics = {"epoch": float(s.epoch), **_numeric(row), SCORE_KEY: checkpoint_score(row, task.best_metric,
                                                                                            task.best_mode), **extra}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    every_epoch = bool(config.get("epoch_reports"))  # a tuning trial: Tune's scheduler needs every epoch

    def save(s: LoopState) -> None:
        if s.epoch >= cfg.train.epochs:  # the final checkpoint is reported after the epilogue, with the summary
            return
        if s.epoch % cfg.train.checkpoint_every == 0:
            report(s, {EPOCH_REPORT_KEY: 1.0} if every_epoch else {})
        else:  # every rank reports (Ray Train gathers one report per rank), without a checkpoint
            ray.train.report({"epoch": float(s.epoch), **_numeric(s.history[-1]), EPOCH_REPORT_KEY: 1.0})

    run_task = _FaultyTask(task, fault, rank) if fault is not None else task
    memory = StepMemory(device, lambda: state_tensors(backend.net, backend.inner_optimizer())) if rank == 0 else None
    state = train_loop(run_task, backend, cfg.train.epochs, state, checkpoint=save,
                       checkpoint_every=1 if every_epoch else cfg.train.checkpoint_every, on_epoch=on_epoch,
                       progress=progress,
                       step_probe=memory.measure if memory is not None else None)
    phases["train_s"] = time.perf_counter() - t_start - phases["data_s"] - phases["deepspeed_init_s"]
    full = backend.full_model()  # a collective under ZeRO-3: every rank
    summary: dict[str, Any] = {}
    untracked: TrackingPendingError | None = None
    if rank == 0:
        write_metrics(state.history, out)
        t_finish = time.perf_counter()
        with backend.eval_autocast():  # bf16: the fp32 master weights under autocast, as a 1-worker GPU run
            summary, _ = finish_run(cfg, task, full, state, out, device, t_finish - t_start, memory)
        phases["finish_s"] = time.perf_counter() - t_finish  # evaluation, energy trace, artifacts, summary
        summary["distributed"] = {"workers": world, "zero_stage": cfg.dist.zero_stage,
                                  "optimizer": backend.optimizer_name, "resumed_from_epoch": resumed_from,
                                  "ds_config": backend.config, "phases_s": phases}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        tracker = pending_tracker.result() if pending_tracker is not None else None
        if tracker is not None:
            try:
                end_tracking(tracker, summary, out,
                             checksum=str(data["checksum"]) if "checksum" in data else None, tags=tags)
            except TrackingPendingError as exc:
                untracked = exc  # reported below, after the final checkpoint: the results are complete
    report(state, {SUMMARY_KEY: json.dumps(summary, default=float)})  # Ray's Result.metrics = last checkpoint's
    if untracked is not None:
        raise untracked


def _attached_tracker(spec: TrackingSpec) -> Any:
    tracker = spec.tracker()
    assert spec.run_id is not None
    tracker.attach(spec.run_id)
    run_id = spec.run_id  # the first query opens the store: done here, off the critical path (a sink call: an
    tracker.sink_call(lambda: tracker.client.get_run(run_id), "opening the store")  # unreachable server waits)
    return tracker


def _tagged(attached: Future[Any], tags: dict[str, str]) -> Any:
    """The attached tracker once rank 0's provenance tags are set (a sink call: an unreachable server skips them
    here; :func:`end_tracking` sets them again when the run closes)."""
    tracker = attached.result()
    tracker.sink_call(lambda: tracker.set_tags(tags), "tagging the run")
    return tracker
