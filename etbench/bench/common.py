"""Shared benchmark plumbing: machine description, timing, peak memory, JSON output."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from etbench.models.energy import EnergyTransformer
from etbench.models.et_config import ETConfig


def cpu_model() -> str | None:
    """The CPU's model name and its AVX-512 feature count from /proc/cpuinfo (machines of one pool differ)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    avx512 = sum(f.startswith("avx512") for f in flags)
    return f"{name} (avx512 features: {avx512})" if name else None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call, synchronised on GPU."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_child(conn, make_step: Callable[..., Callable[[], Any]], args: tuple) -> None:  # type: ignore[no-untyped-def]
    step = make_step(*args)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    step()
    conn.send((_status_kib("VmHWM") - base) / 1024.0)
    conn.close()


def peak_memory_mb(make_step: Callable[..., Callable[[], Any]], args: tuple, device: str) -> float:
    """Peak memory (MiB) one call of ``make_step(*args)()`` adds above its set-up.

    GPU: ``torch.cuda.max_memory_allocated`` around the call. CPU: peak RSS (VmHWM, reset just before the call)
    minus RSS before it, for the first call in a fresh *spawned* process (forking after OpenMP has run can
    deadlock), so ``make_step`` must be a module-level function and ``args`` picklable.
    """
    if device.startswith("cuda"):
        step = make_step(*args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_rss_child, args=(child, make_step, args))
    proc.start()
    value = parent.recv()
    proc.join()
    return float(value)


def write_json(result: dict[str, Any], out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return _status_kib("VmHWM") / 1024.0


ATTN_SCALE = 25.0  # the tiny SPEC init is scaled up so attention is not uniform (a trained-model-like regime)


def make_problem(cfg: ETConfig, batch: int, tokens: int, device: str, seed: int = 0,
                 dtype: torch.dtype = torch.float32,
                 ) -> tuple[EnergyTransformer, torch.optim.AdamW, torch.Tensor, torch.Tensor]:
    """The bare ET block, its AdamW, random tokens and a random MSE target: what one bench step trains on."""
    torch.manual_seed(seed)
    model = EnergyTransformer(cfg).to(device=device, dtype=dtype).train()
    with torch.no_grad():
        for p in (model.attn.wk, model.attn.wq):
            p.mul_(ATTN_SCALE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, tokens, cfg.dim, device=device, dtype=dtype)
    target = torch.randn(batch, tokens, cfg.dim, device=device, dtype=dtype)
    return model, opt, x, target
