"""The GPU check's image section: paper-scale train steps of the ET (both gradient modes) beside a FLOP-matched ViT.

Each model trains on synthetic 224×224 images with the masked-patch loss, through the project's own engines:
DeepSpeed ZeRO (bf16, :class:`~etbench.engine.ds_backend.DeepSpeedBackend`), or — when DeepSpeed is unavailable or
``engine="torch"`` — :class:`~etbench.engine.backend.PlainBackend` (bf16 autocast, AdamW). The ViT is ``vit``:
depth T = 12 at the ET's width and heads with MLP ratio 4 (ViT-B/16), whose forward FLOPs per image are within a
few per cent of the ET's (both are reported, with their ratio). MFU = 3 × forward FLOPs per image × images/s ÷ the
device's dense bf16 peak (the same model FLOPs for both gradient modes, so MFU ranks them as images/s does).
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from etbench.models.registry import IMAGE_PRESETS

PAPER_DATASET, TINY_DATASET = "imagenet", "digits"  # imagenet preset: D 768, H 12, Y 64, M 3072, N 197, T 12
MODELS = (("et", "analytic"), ("et", "autograd"), ("vit", None))


@dataclass(frozen=True)
class StepSettings:
    """How the image section measures: timed steps (capped by seconds), warm-up, per-GPU batch, engine."""

    steps: int = 100
    warmup: int = 10
    batch: int = 64
    zero: int = 2
    engine: str = "deepspeed"  # or "torch" (PlainBackend)
    activation_checkpointing: bool = False
    peak_tflops: float | None = None
    max_seconds: float = 12.0
    tiny: bool = False  # CPU smoke mode: the digits preset (8×8 images) at T = 2


def run_config(model: str, grad_mode: str | None, s: StepSettings, world: int, use_gpu: bool) -> Any:
    from etbench.config import resolve_run_config

    et: dict[str, Any] = {"grad_mode": grad_mode or "analytic"}
    if s.tiny:
        et["steps"] = 2
    return resolve_run_config({
        "task": {"dataset": TINY_DATASET if s.tiny else PAPER_DATASET},
        "model": {"name": model, "et": et},
        "train": {"batch_size": s.batch * world, "epochs": 1, "lr": 1e-4, "warmup_epochs": 0.05, "bf16": use_gpu},
        "dist": {"workers": world, "zero_stage": s.zero, "use_gpu": use_gpu, "deepspeed": s.engine == "deepspeed",
                 "activation_checkpointing": s.activation_checkpointing and model == "et"},
    }, source="gpu_check config")


def synthetic_batches(n: int, batch: int, image_shape: tuple[int, int, int], num_patches: int,
                      device: torch.device, dtype: torch.dtype) -> list[Any]:
    """``n`` fixed (images, mask) pairs, drawn once on the CPU (the timed loop does no data work)."""
    from etbench.tasks.image_completion import draw_mask

    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *image_shape, generator=gen).to(device, dtype),
             draw_mask(batch, num_patches, 0.5, gen, device)) for _ in range(n)]


def _backend(engine: str, model: torch.nn.Module, cfg: Any, n_steps: int, device: torch.device, batch: int,
             factory: Any) -> Any:
    if engine == "deepspeed":
        from etbench.engine.ds_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, n_steps, device, batch, model_factory=factory)
    from etbench.engine.backend import PlainBackend

    return PlainBackend(model, cfg.train, n_steps, device)


def measure(model_name: str, grad_mode: str | None, s: StepSettings, engine: str, world: int,
            device: torch.device) -> dict[str, Any]:
    """Train one model ``s.warmup`` + up to ``s.steps`` steps; images/s, step time, peak memory, MFU."""
    from etbench.engine.build import build_model
    from etbench.tasks.image_completion import patch_losses

    use_gpu = device.type == "cuda"
    cfg = run_config(model_name, grad_mode, s, world, use_gpu)
    shape = IMAGE_PRESETS[cfg.task.dataset].image_shape
    info = {"image_shape": list(shape)}
    model = build_model(cfg, info)
    fpi, params = float(model.flops_per_image()), model.num_parameters()
    if use_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    backend = _backend(engine, model, cfg, s.steps + s.warmup, device, s.batch, lambda: build_model(cfg, info))
    init_s = time.perf_counter() - t0
    in_dtype = torch.bfloat16 if engine == "deepspeed" and use_gpu else torch.float32
    batches = synthetic_batches(4, s.batch, shape, model.num_patches, device, in_dtype)
    std = torch.ones(shape[0])
    losses: list[float] = []

    def step(i: int) -> None:
        images, mask = batches[i % len(batches)]
        with backend.autocast():
            pred = backend.model(images, mask.replaced)
            loss = patch_losses(pred, images, mask, model.patch, std).loss()
        backend.train_step(loss)
        if i % 10 == 0:
            losses.append(float(loss.detach()))

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize(device)

    for i in range(s.warmup):
        step(i)
    sync()
    done, t0 = 0, time.perf_counter()
    while done < s.steps:
        step(s.warmup + done)
        done += 1
        if done % 5 == 0:
            sync()
            if time.perf_counter() - t0 > s.max_seconds:
                break
    sync()
    elapsed = time.perf_counter() - t0
    per_rank = s.batch * done / elapsed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_gpu else None
    out: dict[str, Any] = {
        "model": model_name, "grad_mode": grad_mode, "engine": engine,
        "optimizer": getattr(backend, "optimizer_name", "torch.AdamW"),
        "params": params, "forward_gflops_per_image": fpi / 1e9,
        "steps_timed": done, "images_per_s": per_rank * world, "images_per_s_per_gpu": per_rank,
        "step_ms": 1000 * elapsed / done, "peak_mem_gib": peak, "init_s": init_s,
        "mfu": 3 * fpi * per_rank / (s.peak_tflops * 1e12) if s.peak_tflops else None,
        "losses_every_10": losses, "loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
    }
    return out


def free_memory(device: torch.device) -> None:
    """Let the last model's engine go before the next is built (peak memory is per model)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bf16_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """Measured dense bf16 matmul rate (the practical ceiling beside the datasheet peak); None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


def run_image_section(s: StepSettings, world: int, device: torch.device) -> dict[str, Any]:
    """Every model of :data:`MODELS`; a model that fails is recorded with its error and the others still run.

    With ``engine="deepspeed"``, a DeepSpeed failure (import, op build, initialise) is recorded and that model and
    the later ones run on the plain torch engine instead, so the section always yields figures.
    """
    engine = s.engine
    matmul_tflops = bf16_matmul_tflops(device)  # before any model: the practical ceiling on a fresh allocator
    results: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for model_name, mode in MODELS:
        free_memory(device)
        try:
            results.append(measure(model_name, mode, s, engine, world, device))
            continue
        except Exception as exc:  # one model's failure must not cost the others' figures
            errors.append({"model": model_name, "grad_mode": str(mode), "engine": engine,
                           "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)})
            print(f"gpu_check: {model_name}/{mode} on {engine} failed: {type(exc).__name__}: {exc}", flush=True)
        if engine == "deepspeed" and world == 1:
            engine = "torch"
            free_memory(device)
            try:
                results.append(measure(model_name, mode, s, engine, world, device))
            except Exception as exc:
                errors.append({"model": model_name, "grad_mode": str(mode), "engine": engine,
                               "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)})
    for r in results:
        r["mfu_vs_measured_matmul"] = (3 * r["forward_gflops_per_image"] * 1e9 * r["images_per_s_per_gpu"]
                                       / (matmul_tflops * 1e12)) if matmul_tflops else None
    by = {(r["model"], r["grad_mode"]): r for r in results}
    ratios: dict[str, Any] = {}
    vit, ana, aut = by.get(("vit", None)), by.get(("et", "analytic")), by.get(("et", "autograd"))
    if vit and ana:
        ratios["et_over_vit_forward_flops"] = ana["forward_gflops_per_image"] / vit["forward_gflops_per_image"]
        ratios["et_analytic_over_vit_images_per_s"] = ana["images_per_s"] / vit["images_per_s"]
    if ana and aut:
        ratios["analytic_over_autograd_images_per_s"] = ana["images_per_s"] / aut["images_per_s"]
        if ana["peak_mem_gib"] and aut["peak_mem_gib"]:
            ratios["analytic_over_autograd_peak_mem"] = ana["peak_mem_gib"] / aut["peak_mem_gib"]
    cfg = run_config("et", "analytic", s, world, device.type == "cuda")
    return {"dataset_preset": cfg.task.dataset, "et": cfg.model.et.model_dump(), "image_shape":
            list(IMAGE_PRESETS[cfg.task.dataset].image_shape), "patch": cfg.task.patch, "batch_per_gpu": s.batch,
            "world_size": world, "zero_stage": s.zero if s.engine == "deepspeed" else None,
            "bf16": device.type == "cuda", "peak_tflops": s.peak_tflops, "measured_bf16_matmul_tflops": matmul_tflops,
            "mfu_definition": "3 x forward FLOPs per image x images/s per GPU / peak (datasheet dense bf16; "
                              "mfu_vs_measured_matmul: / the measured 8192^3 bf16 matmul rate)",
            "init_note": "the first DeepSpeed model's init_s includes FusedAdam's JIT build (nvcc) on a fresh machine",
            "results": results, "ratios": ratios, "errors": errors}
