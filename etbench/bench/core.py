"""`etbench bench core`: one ET training step, closed-form vs autograd gradients, interleaved, JSON out.

A training step is forward (T descent steps) + backward + AdamW on an MSE loss, at a CPU-sized config by default
(D 256, H 4, Y 64, M 1024, N 65, B 32, T 12). Both modes are timed in alternation so machine noise hits both alike;
the figures that matter are the median ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from etbench.bench.common import machine_info, peak_memory_mb, summary, timed, write_json
from etbench.models.energy import EnergyTransformer
from etbench.models.et_config import ETConfig

MODES = ("analytic", "autograd")
JAX_REFERENCE_S = 2.5  # authors' jit-compiled JAX ET, same step, B = 32, on one of these 2-core machines


def make_step(cfg: ETConfig, batch: int, tokens: int, device: str, seed: int = 0) -> Callable[[], float]:
    """A closure running one full training step of the bare ET block on random tokens."""
    torch.manual_seed(seed)
    model = EnergyTransformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, tokens, cfg.dim, device=device)
    target = torch.randn(batch, tokens, cfg.dim, device=device)
    # scale the tiny SPEC init up so attention is not uniform (a trained-model-like regime)
    with torch.no_grad():
        for p in (model.attn.wk, model.attn.wq):
            p.mul_(25.0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model.descend(x, trace=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def step_flops(cfg: ETConfig, batch: int, tokens: int) -> int:
    """Matmul FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode on CPU."""
    step = make_step(cfg, batch, tokens, "cpu")
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def run_core_bench(
    out: Path,
    *,
    dim: int = 256,
    heads: int = 4,
    head_dim: int = 64,
    memories: int = 1024,
    tokens: int = 65,
    batch: int = 32,
    steps: int = 12,
    repeats: int = 5,
    device: str = "cpu",
    peak_gflops: float | None = 125.0,
) -> dict[str, Any]:
    """Time and measure both gradient modes; write ``out/bench_core.json`` and return the result."""
    base = ETConfig(dim=dim, heads=heads, head_dim=head_dim, memories=memories, steps=steps)
    cfgs = {m: base.model_copy(update={"grad_mode": m}) for m in MODES}
    model_flops = EnergyTransformer(base).flops(tokens) * batch
    train_flops = {m: step_flops(cfgs[m], batch, tokens) for m in MODES}
    mem = {m: peak_memory_mb(make_step, (cfgs[m], batch, tokens, device), device) for m in MODES}
    steps_fn = {m: make_step(cfgs[m], batch, tokens, device) for m in MODES}
    for m in MODES:  # warm-up (allocator, kernels)
        steps_fn[m]()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for m in order:
            times[m].append(timed(steps_fn[m], device))
    results: dict[str, Any] = {}
    for m in MODES:
        s = summary(times[m])
        s["peak_mem_mb"] = mem[m]
        s["train_step_flops"] = train_flops[m]
        s["achieved_gflops_per_s"] = train_flops[m] / s["median_s"] / 1e9
        if peak_gflops:
            s["fraction_of_peak"] = s["achieved_gflops_per_s"] / peak_gflops
        results[m] = s
    speedup = results["autograd"]["median_s"] / results["analytic"]["median_s"]
    mem_ratio = results["analytic"]["peak_mem_mb"] / max(results["autograd"]["peak_mem_mb"], 1e-9)
    report: dict[str, Any] = {
        "benchmark": "core",
        "what": "one training step: forward T descent steps + backward + AdamW, MSE loss",
        "config": {**base.model_dump(), "tokens": tokens, "batch": batch, "repeats": repeats},
        "machine": machine_info(device),
        "forward_flops_per_step_batch": model_flops,
        "results": results,
        "ratios": {"speedup_analytic_vs_autograd": speedup, "peak_mem_analytic_over_autograd": mem_ratio},
        "targets": {
            "speedup>=3": speedup >= 3.0,
            "mem_ratio<=0.5": mem_ratio <= 0.5,
            f"analytic_step<={JAX_REFERENCE_S / 2}s(half of JAX {JAX_REFERENCE_S}s)": results["analytic"]["median_s"]
            <= JAX_REFERENCE_S / 2,
        },
        "peak_gflops_assumed": peak_gflops,
    }
    write_json(report, out, "bench_core")
    return report
