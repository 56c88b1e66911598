"""GPU check: the paper-scale image ET under bf16 + DeepSpeed ZeRO-2 on synthetic data, both gradient modes.

Run by ``cluster/gpu_check.sh`` (one GPU, or ``NGPU=k`` under torchrun); never in CI. Per gradient mode
(``model.et.grad_mode`` analytic / autograd) it trains ``--steps`` steps of ``IMAGE_PRESETS["imagenet"]`` (D 768,
H 12, Y 64, M 3072, N 197, T 12) through :class:`~etbench.engine.ds_backend.DeepSpeedBackend` and prints images/s,
peak GPU memory and model FLOP utilisation: achieved FLOP/s ÷ the device's dense bf16 peak, with FLOPs per trained
image taken as 3 × the forward ``flops_per_image()`` (the same model FLOPs for both modes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of H100 / H200 SXM


def _fail(msg: str) -> int:
    print(f"gpu_check: {msg}", file=sys.stderr)
    return 2


def _synthetic_batches(n: int, batch: int, num_patches: int, device: torch.device) -> list[Any]:
    from etbench.tasks.image_completion import draw_mask

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, 224, 224, generator=gen).to(device, torch.bfloat16)
        out.append((images, draw_mask(batch, num_patches, 0.5, gen, device)))
    return out


def run_mode(mode: str, args: argparse.Namespace, world: int, device: torch.device) -> dict[str, Any]:
    """Train ``args.steps`` steps in one gradient mode; returns throughput, memory and utilisation."""
    from etbench.config import resolve_run_config
    from etbench.engine.build import build_model
    from etbench.engine.ds_backend import DeepSpeedBackend
    from etbench.tasks.image_completion import patch_losses

    cfg = resolve_run_config({
        "task": {"dataset": "imagenet"},
        "model": {"et": {"grad_mode": mode}},
        "train": {"batch_size": args.batch * world, "epochs": 1, "lr": 1e-4, "warmup_epochs": 0.05, "bf16": True},
        "dist": {"workers": world, "zero_stage": args.zero, "use_gpu": True, "deepspeed": True,
                 "activation_checkpointing": args.activation_checkpointing},
    }, source="gpu_check config")
    info = {"image_shape": [3, 224, 224]}
    model = build_model(cfg, info)
    fpi = float(model.flops_per_image())
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    backend = DeepSpeedBackend(model, cfg, args.steps + args.warmup, device, args.batch,
                               model_factory=lambda: build_model(cfg, info))
    init_s = time.perf_counter() - t0
    batches = _synthetic_batches(4, args.batch, model.num_patches, device)
    std = torch.ones(3)
    losses = []

    def step(i: int) -> None:
        images, mask = batches[i % len(batches)]
        pred = backend.model(images, mask.replaced)
        loss = patch_losses(pred, images, mask, model.patch, std).loss()
        backend.train_step(loss)
        if i % 50 == 0:
            losses.append(float(loss.detach()))

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    per_gpu = args.batch * args.steps / elapsed
    result = {
        "grad_mode": mode, "images_per_s": per_gpu * world, "images_per_s_per_gpu": per_gpu,
        "step_ms": 1000 * elapsed / args.steps, "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "forward_gflops_per_image": fpi / 1e9,
        "mfu": 3 * fpi * per_gpu / (args.peak_tflops * 1e12),
        "init_s": init_s, "optimizer": backend.optimizer_name, "losses_every_50": losses,
    }
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per gradient mode")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--modes", nargs="+", default=["analytic", "autograd"], choices=("analytic", "autograd"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="device dense bf16 peak (TFLOP/s)")
    p.add_argument("--out", default="results/gpu_check.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        return _fail("no CUDA device is visible (torch.cuda.is_available() is False); run this on a GPU node")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        return _fail(f"environment lacks {', '.join(missing)}; start it with cluster/gpu_check.sh (or torchrun)")
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return _fail(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} would keep DeepSpeed off the GPU; unset it")
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        results = []
        for m in args.modes:
            results.append(run_mode(m, args, world, device))
            gc.collect()  # free this mode's engine before the next one
            torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        report = {"gpu": torch.cuda.get_device_name(device), "world_size": world, "batch_per_gpu": args.batch,
                  "zero_stage": args.zero, "steps": args.steps, "peak_tflops": args.peak_tflops,
                  "torch": torch.__version__, "results": results}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"{report['gpu']} × {world}, ZeRO-{args.zero}, bf16, batch {args.batch}/GPU, {args.steps} steps")
        for r in results:
            print(f"  {r['grad_mode']:9s} {r['images_per_s']:9.1f} img/s  {r['step_ms']:7.1f} ms/step  "
                  f"peak {r['peak_mem_gib']:6.2f} GiB  MFU {100 * r['mfu']:5.1f} %  ({r['optimizer']}, "
                  f"init {r['init_s']:.0f} s)")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
