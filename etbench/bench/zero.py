"""`etbench bench zero`: per-worker model-state bytes and throughput of DeepSpeed ZeRO 0–3 vs one process, JSON out.

``world`` ranks are spawned locally (gloo on CPU, nccl on GPU; rendezvous on 127.0.0.1). For each stage every rank
builds the run's task shard and model, wraps them in :class:`~etbench.engine.ds_backend.DeepSpeedBackend` and
trains ``steps`` micro-batches. Hooks on the optimizer that actually updates measure, at the second update,
the bytes this rank holds: parameters (``ds_tensor`` partitions under ZeRO-3), gradients (live at the update),
optimizer state (Adam moments) and the fp32 master partition DeepSpeed keeps beside the model under ZeRO 1–3.
Optionally each stage also saves a checkpoint, continues two steps, reloads into a fresh engine and repeats them
(``resume_exact``). The single-process baseline trains the *same global batches* (every rank's shard batch,
concatenated) with :class:`~etbench.engine.backend.PlainBackend`, so at ZeRO-0 its losses equal the ranks' mean.
It gets the resources of one rank (its torch threads, or one GPU), so ``throughput_vs_single`` is the data-parallel
speed-up of ``world`` workers over one (ideal: ``world``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from etbench.bench.common import machine_info, write_json
from etbench.config import RunConfig, resolve_run_config
from etbench.engine.build import build_model, build_task, resolve_device, seed_everything


class MergedShardsTask:
    """One process seeing exactly the global batches of a ``world``-worker run (shard batches concatenated).

    Image tasks only. Evaluation runs on the unsharded data, which equals the reduced sums over shards.
    """

    def __init__(self, cfg: RunConfig, world: int, device: torch.device) -> None:
        self.shards = [build_task(cfg, device, r, world) for r in range(world)]
        single = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"workers": 1})})
        self.full = build_task(single, device, 0, 1)
        self.best_metric, self.best_mode = self.full.best_metric, self.full.best_mode
        self.samples_per_epoch = sum(t.samples_per_epoch for t in self.shards)

    def num_train_batches(self) -> int:
        return self.shards[0].num_train_batches()

    def train_batches(self, epoch: int) -> Iterator[Any]:
        from etbench.tasks.image_completion import PatchMask

        for parts in zip(*(t.train_batches(epoch) for t in self.shards), strict=True):
            images = torch.cat([p[0] for p in parts])
            yield images, PatchMask(torch.cat([p[1].chosen for p in parts]), torch.cat([p[1].replaced for p in parts]))

    def train_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.full.train_loss(model, batch)

    def evaluate(self, model: torch.nn.Module, reduce: Any) -> dict[str, float]:
        return self.full.evaluate(model, reduce)

    def describe(self) -> dict[str, Any]:
        return self.full.describe()


def _keyed(tensors: Any) -> dict[tuple[int, int], int]:
    """Distinct tensors as (address, bytes) → bytes; views of the same memory region count once."""
    out = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            n = t.numel() * t.element_size()
            out[(t.data_ptr(), n)] = n
    return out


class StateProbe:
    """Bytes of parameters, gradients, optimizer state and master weights one rank holds at one update.

    DeepSpeed's ZeRO optimizers call the wrapped torch optimizer once per parameter (sub-)group, so the hooks
    collect the union over all calls made during update number ``at_update`` (1-based, counted by the engine).
    """

    def __init__(self, backend: Any, at_update: int = 2) -> None:
        self.backend, self.at_update = backend, at_update
        self.grads: dict[tuple[int, int], int] = {}
        self.masters: dict[tuple[int, int], int] = {}
        self.states: dict[tuple[int, int], int] = {}
        opt = backend.inner_optimizer()
        self._hooks = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]

    def _active(self) -> bool:
        return self.backend.engine.global_steps + 1 == self.at_update

    def _pre(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        if self._active():
            self.grads.update(_keyed(p.grad for p in self.backend.module().parameters()))
            self.grads.update(_keyed(p.grad for g in opt.param_groups for p in g["params"]))

    def _post(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        if not self._active():
            return
        model_storage = {p.untyped_storage().data_ptr() for p in self.backend.module().parameters() if p.numel()}
        self.masters.update(_keyed(p for g in opt.param_groups for p in g["params"]
                                   if p.untyped_storage().data_ptr() not in model_storage))
        self.states.update(_keyed(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))

    def result(self) -> dict[str, int]:
        params = _keyed(getattr(p, "ds_tensor", p) for p in self.backend.module().parameters())
        return {"params": sum(params.values()), "grads": sum(self.grads.values()),
                "optimizer_state": sum(self.states.values()), "master": sum(self.masters.values())}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _stage_config(cfg: RunConfig, stage: int, world: int) -> RunConfig:
    dist = cfg.dist.model_copy(update={"zero_stage": stage, "workers": world, "deepspeed": True})
    return cfg.model_copy(update={"dist": dist})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_steps(task: Any, backend: Any, batches: list[Any], device: torch.device) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for batch in batches:
        _sync(device)
        t0 = time.perf_counter()
        with backend.autocast():
            loss = task.train_loss(backend.model, batch)
        backend.train_step(loss)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return losses, times


def _batches(task: Any, n: int) -> list[Any]:
    out: list[Any] = []
    epoch = 0
    while len(out) < n:
        out += list(task.train_batches(epoch))
        epoch += 1
    return out[:n]


def measure_stage(cfg: RunConfig, steps: int, check_resume: bool, ckpt: Path) -> dict[str, Any]:
    """One rank, one ZeRO stage: losses, step times, state bytes, partitioned elements, resume check."""
    import torch.distributed as dist

    from etbench.engine.ds_backend import DeepSpeedBackend

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.dist.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.dist.use_gpu and cfg.train.bf16 else torch.float32
    seed_everything(cfg.train.seed)
    task = build_task(cfg, device, rank, world, dtype)

    def factory() -> torch.nn.Module:
        return build_model(cfg, task.describe())

    def backend() -> DeepSpeedBackend:
        return DeepSpeedBackend(factory(), cfg, task.num_train_batches(), device, task.micro_batch,
                                model_factory=factory)

    t0 = time.perf_counter()
    be = backend()
    init_s = time.perf_counter() - t0
    probe = StateProbe(be)
    batches = _batches(task, steps + 2)
    losses, times = _train_steps(task, be, batches[:steps], device)
    probe.close()
    held, total = be.partitioned_elements()
    row: dict[str, Any] = {"losses": losses, "step_s": times, "init_s": init_s, "bytes": probe.result(),
                           "param_elements_held": held, "param_elements_total": total,
                           "optimizer": be.optimizer_name, "micro_batch": task.micro_batch}
    if check_resume:
        be.save(ckpt, {"step": steps})
        cont, _ = _train_steps(task, be, batches[steps:], device)
        del be
        fresh = backend()
        client = fresh.load(ckpt)
        again, _ = _train_steps(task, fresh, batches[steps:], device)
        row.update(resume_client=client, continued=cont, resumed=again, resume_exact=cont == again)
    return row


def _rank_main(rank: int, world: int, port: int, cfg_json: str, stages: list[int], steps: int, check_resume: bool,
               result_dir: str, threads: int) -> None:
    """Entry point of one spawned rank (module level so ``spawn`` can import it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    cfg = RunConfig.model_validate_json(cfg_json)
    if not cfg.dist.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(rank)
    torch.set_num_threads(threads)
    import torch.distributed as dist

    dist.init_process_group("nccl" if cfg.dist.use_gpu else "gloo")
    try:
        rows = {}
        for stage in stages:
            ckpt = Path(result_dir) / f"ckpt_zero{stage}"
            rows[str(stage)] = measure_stage(_stage_config(cfg, stage, world), steps, check_resume, ckpt)
        (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(rows, default=float))
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Any, world: int, args: tuple, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes; kill them all on error or timeout."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()


def _single_baseline(cfg: RunConfig, world: int, steps: int, threads: int) -> dict[str, Any]:
    """One process (one rank's threads / one GPU) training the same global batches with PlainBackend."""
    from etbench.engine.backend import PlainBackend

    device = resolve_device("cpu" if not cfg.dist.use_gpu else "cuda", cfg.dist.use_gpu)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seed_everything(cfg.train.seed)
        task = MergedShardsTask(cfg, world, device)
        backend = PlainBackend(build_model(cfg, task.describe()), cfg.train, task.num_train_batches(), device,
                               cfg.dist.grad_accum)
        losses, times = _train_steps(task, backend, _batches(task, steps), device)
    finally:
        torch.set_num_threads(before)
    return {"losses": losses, "step_s": times}


def _summarise(ranks: list[dict[str, Any]], stage: str, global_batch: int, warmup: int) -> dict[str, Any]:
    rows = [r[stage] for r in ranks]
    step_s = [max(ts) for ts in zip(*(r["step_s"] for r in rows), strict=True)][warmup:]
    per_worker = [{k: int(v) for k, v in r["bytes"].items()} for r in rows]
    for b in per_worker:
        b["sharded_states"] = b.get("params", 0) + b.get("grads", 0) + b.get("optimizer_state", 0)
        b["total"] = b["sharded_states"] + b.get("master", 0)
    out: dict[str, Any] = {
        "per_worker_bytes": per_worker,
        "param_elements_held": [r["param_elements_held"] for r in rows],
        "param_elements_total": rows[0]["param_elements_total"],
        "losses_mean_over_ranks": [statistics.fmean(x) for x in zip(*(r["losses"] for r in rows), strict=True)],
        "images_per_s": global_batch / statistics.median(step_s) if step_s else float("nan"),
        "init_s": max(r["init_s"] for r in rows),
        "optimizer": rows[0]["optimizer"],
    }
    if "resume_exact" in rows[0]:
        out["resume_exact"] = all(r["resume_exact"] for r in rows)
    return out


def run_zero_bench(out: Path, *, world: int = 2, stages: tuple[int, ...] = (0, 1, 2, 3), steps: int = 12,
                   warmup: int = 2, overrides: dict[str, Any] | None = None, check_resume: bool = True,
                   use_gpu: bool = False, timeout_s: float = 900.0) -> dict[str, Any]:
    """Measure ZeRO ``stages`` at ``world`` ranks against one process; writes ``out/bench_zero.json``."""
    from etbench.engine.ds_backend import free_port

    if world < 2:
        raise ValueError(f"bench zero needs world >= 2 ranks to shard anything, got {world}")
    if steps < warmup + 2:
        raise ValueError(f"steps ({steps}) must exceed warmup ({warmup}) by at least 2 (state is read at update 2)")
    base = {"task": {"dataset": "digits"}, "train": {"batch_size": 64, "epochs": 1}}
    from etbench.config import deep_merge

    cfg = resolve_run_config(deep_merge(base, overrides or {}), source="bench zero config")
    cfg = _stage_config(cfg, 0, world)
    if use_gpu:
        cfg = cfg.model_copy(update={"dist": cfg.dist.model_copy(update={"use_gpu": True})})
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="etbench-zero-") as tmp:
        spawn_ranks(_rank_main, world, (world, free_port(), cfg.model_dump_json(), list(stages), steps, check_resume,
                                        tmp, threads), timeout_s)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
    single = _single_baseline(cfg, world, steps, threads)
    micro = ranks[0][str(stages[0])]["micro_batch"]
    global_batch = micro * world
    single_ips = global_batch / statistics.median(single["step_s"][warmup:])
    results = {str(s): _summarise(ranks, str(s), global_batch, warmup) for s in stages}
    for r in results.values():
        r["throughput_vs_single"] = r["images_per_s"] / single_ips
    ratios = {}
    if "0" in results:
        zero0 = results["0"]["per_worker_bytes"][0]
        for s, r in results.items():
            b = r["per_worker_bytes"][0]
            ratios[s] = {k: b[k] / zero0[k] for k in ("params", "grads", "optimizer_state", "sharded_states", "total")
                         if zero0.get(k)}
    report = {
        "bench": "zero", "machine": machine_info("cuda" if use_gpu else "cpu"), "world_size": world,
        "torch_threads_per_rank": threads, "global_batch": global_batch, "steps": steps, "warmup": warmup,
        "config": cfg.model_dump(mode="json"),
        "single": {"images_per_s": single_ips, "losses": single["losses"]},
        "stages": results, "state_ratio_vs_zero0": ratios,
        "target": {"zero3_sharded_states_ratio": 1 / world},
    }
    write_json(report, Path(out), "bench_zero")
    return report
