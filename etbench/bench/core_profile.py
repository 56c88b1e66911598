"""Where the ET training step's time goes: a torch-profiler per-op table grouped into GEMM / softmax / LN-type
reductions / element-wise / copies / optimizer / allocator, and the GEMM rates each backend reaches at the step's
shapes (the decomposition `etbench bench core` records next to its timings).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

CATEGORIES: dict[str, tuple[str, ...]] = {
    "gemm": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mkldnn_linear",
             "aten::_mkldnn_matmul", "aten::mkldnn_matmul", "aten::_addmm_activation", "mkldnn::"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data", "aten::logsumexp", "aten::_log_softmax",
                "aten::exp"),
    "ln_reductions": ("aten::mean", "aten::sum", "aten::rsqrt", "aten::var", "aten::sqrt", "aten::norm",
                      "aten::linalg_vector_norm", "aten::amax", "aten::max"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack", "aten::_to_copy",
               "aten::to_mkldnn", "aten::to_dense", "aten::_reshape_alias", "aten::index", "aten::flip"),
    "optimizer": ("aten::_foreach_", "Optimizer."),
    "allocator": ("aten::empty", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::ones_like",
                  "aten::full", "aten::new_", "aten::resize_", "aten::empty_like", "aten::fill_", "aten::zero_",
                  "[memory]"),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::neg", "aten::relu",
                    "aten::threshold", "aten::where", "aten::masked_fill", "aten::pow", "aten::gt", "aten::ge",
                    "aten::clamp", "aten::rsub", "aten::sigmoid", "aten::lerp", "aten::addcmul", "aten::addcdiv",
                    "aten::square", "aten::reciprocal", "aten::mse_loss", "aten::maximum", "aten::eq",
                    "aten::logical", "aten::bitwise", "aten::lt", "aten::le", "aten::abs", "aten::sign"),
}


def categorize(name: str) -> str:
    """The category of one profiler op name (``other`` when none of the prefixes match)."""
    for cat, prefixes in CATEGORIES.items():
        if any(name.startswith(p) for p in prefixes):
            return cat
    return "other"


def _linear_pointwise_flops(name: str, shapes: list[list[int]] | None, count: int) -> float:
    """FLOPs of oneDNN ``_linear_pointwise`` calls (the profiler counts none): 2·rows·K·N per call."""
    if "_linear_pointwise" not in name or not shapes or len(shapes) < 2 or len(shapes[1]) != 2:
        return 0.0
    x, w = shapes[0], shapes[1]
    return 2.0 * math.prod(x[:-1]) * x[-1] * w[0] * count


def profile_step(step: Callable[[], Any], device: str = "cpu", calls: int = 1, top: int = 15) -> dict[str, Any]:
    """Profile ``calls`` already-warm calls of ``step``: self time per category and per op, GEMM rate, allocations.

    Self times are the time an op spends outside its children, so the categories partition the traced time; the
    rest of the wall time (``untraced_s``) is Python and autograd-engine overhead between ops.
    """
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's start/stop chatter on stderr
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True, with_flops=True, profile_memory=True) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    gpu = device.startswith("cuda")
    cats: dict[str, dict[str, float]] = {}
    by_op: dict[str, dict[str, Any]] = {}
    gemm_flops = 0.0
    alloc_bytes = 0
    for ev in prof.key_averages(group_by_input_shape=True):
        self_us = (ev.self_device_time_total if gpu else ev.self_cpu_time_total) / calls
        cat = categorize(ev.key)
        c = cats.setdefault(cat, {"self_s": 0.0, "calls": 0})
        c["self_s"] += self_us / 1e6
        c["calls"] += ev.count // calls
        flops = float(getattr(ev, "flops", 0) or 0) or _linear_pointwise_flops(ev.key, ev.input_shapes, ev.count)
        flops /= calls
        if cat == "gemm":
            gemm_flops += flops
        alloc_bytes += max(int(getattr(ev, "self_cpu_memory_usage", 0) or 0), 0)
        o = by_op.setdefault(ev.key, {"op": ev.key, "category": cat, "self_s": 0.0, "calls": 0, "gflops": 0.0})
        o["self_s"] += self_us / 1e6
        o["calls"] += ev.count // calls
        o["gflops"] += flops / 1e9
    ops = list(by_op.values())
    traced = sum(c["self_s"] for c in cats.values())
    for c in cats.values():
        c["share"] = c["self_s"] / traced if traced else 0.0
    ops.sort(key=lambda o: -o["self_s"])
    gemm_s = cats.get("gemm", {}).get("self_s", 0.0)
    return {
        "wall_s": wall,
        "traced_self_s": traced,
        "untraced_s": max(wall - traced, 0.0) if not gpu else None,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["self_s"])),
        "gemm_gflops": gemm_flops / 1e9,
        "gemm_rate_gflops_per_s": gemm_flops / gemm_s / 1e9 if gemm_s else None,
        "allocated_mb_per_step": alloc_bytes / 2**20,
        "top_ops": ops[:top],
        "time_basis": "self device time" if gpu else "self CPU time",
    }


def _rate(fn: Callable[[], Any], flops: float, repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def gemm_rates(rows: int, inner: int, cols: int, device: str = "cpu", repeats: int = 20,
               xla: bool = False) -> dict[str, Any]:
    """Best-of-``repeats`` fp32 GFLOP/s of (rows × inner) @ (inner × cols) on each backend reachable here.

    ``torch_mm``: ``torch.mm`` (MKL on CPU); ``torch_onednn_dense``: etbench's oneDNN route on dense tensors
    (:mod:`etbench.models.gemm`); ``torch_mkldnn_linear``: oneDNN on mkldnn-layout tensors (CPU only);
    ``xla_dot``: jitted ``jnp.dot`` on jax's device for ``device`` (when ``xla`` and jax is importable).
    """
    flops = 2.0 * rows * inner * cols
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=gen).to(device)
    b = torch.randn(inner, cols, generator=gen).to(device)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    out: dict[str, Any] = {"shape": [rows, inner, cols], "repeats": repeats}
    out["torch_mm"] = _rate(lambda: torch.mm(a, b), flops, repeats, sync)
    if device == "cpu" and torch.backends.mkldnn.is_available():
        from etbench.models import gemm

        wt = b.T.contiguous()
        with gemm.use_backend("onednn"):
            out["torch_onednn_dense"] = _rate(lambda: gemm.linear(a, wt), flops, repeats, sync)
        am, wm = a.to_mkldnn(), b.T.contiguous().to_mkldnn()
        out["torch_mkldnn_linear"] = _rate(lambda: torch._C._nn.mkldnn_linear(am, wm, None), flops, repeats, sync)
    if xla:
        from etbench.peers import xla_et

        if xla_et.available():
            try:
                out["xla_dot"] = xla_et.dot_rate(rows, inner, cols, device, repeats)
            except RuntimeError as e:
                out["xla_dot"] = None
                out["xla_skipped"] = str(e)
    return out
