"""`etbench bench core`: one ET training step — closed-form vs autograd gradients, and optionally the same step in
JAX/XLA (``peer="xla"``) — timed interleaved in one process, JSON out.

A training step is forward (T descent steps) + backward + AdamW on an MSE loss, at a CPU-sized config by default
(D 256, H 4, Y 64, M 1024, N 65, B 32, T 12). All modes are timed in alternation (rotating order) so machine noise
hits them alike; the figures that matter are the median ratios. The XLA peer (:mod:`etbench.peers.xla_et`) starts
from the same parameters and inputs, so it is the same computation (tests/test_xla_peer.py checks loss and
gradients agree in float64).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from etbench.bench.common import machine_info, make_problem, peak_memory_mb, summary, timed, write_json
from etbench.models.energy import EnergyTransformer
from etbench.models.et_config import ETConfig

if TYPE_CHECKING:
    from etbench.bench.core_compile import CompiledStep

MODES = ("analytic", "autograd")
PEERS = ("xla",)
# dense fp32 peaks (GFLOP/s) by GPU name, for MFU-style figures; TF32/bf16 tensor-core peaks are not fp32 work
GPU_FP32_PEAK_GFLOPS = {"H200": 67_000.0, "H100": 67_000.0, "A100": 19_500.0, "L40S": 91_600.0, "A10": 31_200.0}


def step_closure(model: EnergyTransformer, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                 ) -> Callable[[], float]:
    """One training step: zero grads, T descent steps, MSE loss, backward, AdamW; returns the loss."""

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model.descend(x, trace=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def make_step(cfg: ETConfig, batch: int, tokens: int, device: str, seed: int = 0) -> Callable[[], float]:
    """A closure running one full training step of the bare ET block (module level: picklable for spawn)."""
    return step_closure(*make_problem(cfg, batch, tokens, device, seed))


def make_xla_step(cfg: ETConfig, batch: int, tokens: int, device: str, seed: int = 0) -> Callable[[], float]:
    """The same step in JAX (compiled ahead of time here), from the very parameters and inputs ``make_step`` uses."""
    from etbench.peers.xla_et import StepSpec, XLAStep, params_from_module

    model, opt, x, target = make_problem(cfg, batch, tokens, "cpu", seed)
    spec = StepSpec.from_torch(cfg, opt)
    return XLAStep(spec, params_from_module(model), x.numpy(), target.numpy(), device=device)


def step_flops(cfg: ETConfig, batch: int, tokens: int) -> int:
    """Matmul FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode on CPU."""
    step = make_step(cfg, batch, tokens, "cpu")
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def load_average() -> list[float] | None:
    """1, 5, 15-minute load averages (other users of the cores make timings noisy)."""
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return None


def device_peak_gflops(device: str) -> tuple[float | None, str]:
    """Dense fp32 peak of a known GPU (GFLOP/s) and where the figure comes from; None on CPU / unknown GPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_FP32_PEAK_GFLOPS.items():
            if key in name:
                return peak, f"{key} dense fp32 (datasheet)"
        return None, f"unknown GPU {name!r}: pass peak_gflops"
    return None, "cpu: the measured best GEMM rate stands in for the peak (see gemm_rates)"


def _xla_runner(cfg: ETConfig, batch: int, tokens: int, device: str) -> tuple[Callable[[], float] | None, dict]:
    """The XLA peer's step, or None and the reason it cannot run here (jax missing, no jax GPU backend)."""
    from etbench.peers import xla_et

    if not xla_et.available():
        return None, {"skipped": "jax is not installed (pip install 'etbench[peers]')"}
    try:
        step = make_xla_step(cfg, batch, tokens, device)
    except RuntimeError as e:
        return None, {"skipped": str(e)}
    import jax

    info: dict[str, Any] = {"jax_device": str(step.device), "jax_version": jax.__version__,
                            "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_memory": step.memory_analysis(),
                            "xla_cost_flops": step.cost_flops()}
    return step, info


def run_core(
    out_dir: Path | str,
    device: str = "cpu",
    peer: str | None = None,
    *,
    dim: int = 256,
    heads: int = 4,
    head_dim: int = 64,
    memories: int = 1024,
    tokens: int = 65,
    batch: int = 32,
    steps: int = 12,
    repeats: int = 5,
    peak_gflops: float | None = None,
    profile: bool = True,
    measure_memory: bool = True,
    levers: bool = True,
    threads: int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Time both gradient modes (and the ``peer``) interleaved; write ``out_dir/bench_core.json`` and return it.

    ``peer="xla"`` adds the JAX/XLA step on the matching jax device (skipped, with the reason in the JSON, when jax
    or its GPU backend is absent). ``peak_gflops`` overrides the device peak used for the MFU-style figures.
    ``levers`` (CPU) also times the default mode with each speed lever switched the other way (the GEMM backend, one
    torch thread), in the same rotation: the recorded measurement behind each default. ``threads`` sets torch's
    intra-op threads for the run (restored afterwards); jax keeps its own thread pool. ``compile`` adds the default
    mode with its forward under ``torch.compile`` (:mod:`etbench.bench.core_compile`: graph breaks, recompiles,
    compile seconds, break-even steps; costs about a minute of compilation on 2 cores).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_core(Path(out_dir), device, peer, dim=dim, heads=heads, head_dim=head_dim, memories=memories,
                         tokens=tokens, batch=batch, steps=steps, repeats=repeats, peak_gflops=peak_gflops,
                         profile=profile, measure_memory=measure_memory, levers=levers, compile=compile)
    finally:
        torch.set_num_threads(old_threads)


def _run_core(out_dir: Path, device: str, peer: str | None, *, dim: int, heads: int, head_dim: int, memories: int,
              tokens: int, batch: int, steps: int, repeats: int, peak_gflops: float | None, profile: bool,
              measure_memory: bool, levers: bool, compile: bool = False) -> dict[str, Any]:
    if peer is not None and peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS} or None, got {peer!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    load_before = load_average()
    base = ETConfig(dim=dim, heads=heads, head_dim=head_dim, memories=memories, steps=steps)
    cfgs = {m: base.model_copy(update={"grad_mode": m}) for m in MODES}
    model_flops = EnergyTransformer(base).flops(tokens) * batch
    train_flops: dict[str, float] = {m: step_flops(cfgs[m], batch, tokens) for m in MODES}
    mem = {m: peak_memory_mb(make_step, (cfgs[m], batch, tokens, device), device) for m in MODES} \
        if measure_memory else {}
    runners: dict[str, Callable[[], float]] = {m: make_step(cfgs[m], batch, tokens, device) for m in MODES}
    if levers and device == "cpu":
        runners.update(_lever_runners(cfgs[base.grad_mode], batch, tokens))
    compiled: CompiledStep | None = None
    if compile:
        from etbench.bench.core_compile import CompiledStep

        compiled = CompiledStep(cfgs[base.grad_mode], batch, tokens, device)
        runners[f"{base.grad_mode}[compile]"] = compiled
    peer_info: dict[str, Any] = {}
    if peer == "xla":
        xla_step, peer_info = _xla_runner(base, batch, tokens, device)
        if xla_step is not None:
            runners["xla"] = xla_step
            if peer_info["xla_cost_flops"]:
                train_flops["xla"] = peer_info["xla_cost_flops"]
            if measure_memory and not device.startswith("cuda"):
                mem["xla"] = peak_memory_mb(make_xla_step, (base, batch, tokens, device), device)
    names = list(runners)
    for _ in range(2):  # warm-up (allocator, kernels, XLA's first execution)
        for m in names:
            runners[m]()
    times: dict[str, list[float]] = {m: [] for m in names}
    cpu: dict[str, list[float]] = {m: [] for m in names}  # process CPU seconds: less hit by other users' load
    for r in range(repeats):
        shift = r % len(names)
        for m in names[shift:] + names[:shift]:
            c0 = time.process_time()
            times[m].append(timed(runners[m], device))
            cpu[m].append(time.process_time() - c0)
    peak, peak_source = (peak_gflops, "given") if peak_gflops else device_peak_gflops(device)
    results: dict[str, Any] = {}
    for m in names:
        s = summary(times[m])
        s["median_cpu_s"], s["cpu_s"] = statistics.median(cpu[m]), cpu[m]
        if m in mem:
            s["peak_mem_mb"] = mem[m]
        if m in train_flops:
            s["train_step_flops"] = train_flops[m]
            s["achieved_gflops_per_s"] = train_flops[m] / s["median_s"] / 1e9
        s["model_gflops_per_s"] = 3 * model_flops / s["median_s"] / 1e9  # common work: 3 × forward FLOPs
        if peak:
            s["mfu"] = s["model_gflops_per_s"] / peak
        results[m] = s
    default_mode = base.grad_mode
    decomposition: dict[str, Any] = {}
    if profile:
        from etbench.bench.core_profile import gemm_rates, profile_step

        decomposition["gemm_rates"] = gemm_rates(batch * tokens, dim, base.num_memories, device, xla=peer == "xla")
        decomposition["profile"] = {m: profile_step(runners[m], device) for m in MODES}
        decomposition["gemm_bound"] = _gemm_bound(decomposition, base.grad_mode, train_flops.get("xla"))
    ratios: dict[str, Any] = {
        "speedup_analytic_vs_autograd": results["autograd"]["median_s"] / results["analytic"]["median_s"],
    }
    if "analytic" in mem and "autograd" in mem:
        ratios["peak_mem_analytic_over_autograd"] = mem["analytic"] / max(mem["autograd"], 1e-9)
    if "xla" in results:
        for m in MODES:
            ratios[f"speed_{m}_over_xla"] = results["xla"]["median_s"] / results[m]["median_s"]
            ratios[f"cpu_efficiency_{m}_over_xla"] = results["xla"]["median_cpu_s"] / results[m]["median_cpu_s"]
    lever_report = _lever_report(results, base.grad_mode)
    if compiled is not None:
        from etbench.bench.core_compile import explain_mode

        lever_report["compile"].update(compiled.report(results, base.grad_mode, f"{base.grad_mode}[compile]"))
        other = next(m for m in MODES if m != base.grad_mode)
        lever_report["compile"][f"{other}_mode_trace"] = explain_mode(cfgs[other], batch, tokens, device)
    report: dict[str, Any] = {
        "benchmark": "core",
        "what": "one training step: forward T descent steps + backward + AdamW, MSE loss",
        "config": {**base.model_dump(), "tokens": tokens, "batch": batch, "repeats": repeats, "peer": peer},
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": load_average()},
        "default_mode": default_mode,
        "forward_flops_per_step_batch": model_flops,
        "peak_gflops": peak,
        "peak_source": peak_source,
        "peer": peer_info or None,
        "results": results,
        "ratios": ratios,
        "levers": lever_report or None,
        "decomposition": decomposition or None,
        "targets": _targets(ratios, default_mode),
    }
    write_json(report, out_dir, "bench_core")
    return report


def _gemm_bound(dec: dict[str, Any], mode: str, xla_flops: float | None) -> dict[str, Any]:
    """The default mode's profiled time split into GEMM and the rest, and the GEMM time at the best torch rate
    measured here and at XLA's rate: what closing the gap to XLA needs, in seconds."""
    prof, rates = dec["profile"][mode], dec["gemm_rates"]
    torch_rates = {k: v for k, v in rates.items() if k.startswith("torch_") and isinstance(v, float)}
    best = max(torch_rates, key=torch_rates.__getitem__) if torch_rates else None
    gemm_s = prof["categories"].get("gemm", {}).get("self_s", 0.0)
    out: dict[str, Any] = {
        "profiled_wall_s": prof["wall_s"],
        "gemm_s": gemm_s,
        "non_gemm_s": prof["wall_s"] - gemm_s,
        "gemm_gflops": prof["gemm_gflops"],
        "best_torch_gemm": best,
        "gemm_s_at_best_torch_rate": prof["gemm_gflops"] / torch_rates[best] if best else None,
    }
    if rates.get("xla_dot"):
        out["gemm_s_at_xla_rate"] = prof["gemm_gflops"] / rates["xla_dot"]
        if xla_flops:
            out["xla_step_s_at_xla_dot_rate"] = xla_flops / 1e9 / rates["xla_dot"]
    return out


def _lever_runners(cfg: ETConfig, batch: int, tokens: int) -> dict[str, Callable[[], float]]:
    """The default mode with one lever flipped: the other CPU GEMM backend; one torch thread (two if using one)."""
    from etbench.models import gemm

    other = next(b for b in gemm.BACKENDS if b != gemm.backend())
    flipped = make_step(cfg, batch, tokens, "cpu")

    def other_gemm() -> float:
        with gemm.use_backend(other):
            return flipped()

    out = {f"{cfg.grad_mode}[gemm={other}]": other_gemm}
    threads = torch.get_num_threads()
    flip = 1 if threads > 1 else min(2, os.cpu_count() or 1)
    if flip != threads:
        other_step = make_step(cfg, batch, tokens, "cpu")

        def other_threads() -> float:
            torch.set_num_threads(flip)
            try:
                return other_step()
            finally:
                torch.set_num_threads(threads)

        out[f"{cfg.grad_mode}[threads={flip}]"] = other_threads
    return out


def _lever_report(results: dict[str, Any], mode: str) -> dict[str, Any]:
    """Per lever: the default's median over the flipped one's (> 1: the default setting is faster)."""
    from etbench.models import gemm

    out: dict[str, Any] = {}
    for name, r in results.items():
        if name.startswith(f"{mode}[") and name.endswith("]"):
            setting = name[len(mode) + 1:-1]
            out[setting] = {"flipped_median_s": r["median_s"], "default_median_s": results[mode]["median_s"],
                            "default_speedup": r["median_s"] / results[mode]["median_s"],
                            "default_cpu_saving": r["median_cpu_s"] / results[mode]["median_cpu_s"]}
    if out:
        out["defaults"] = {"gemm": gemm.backend(), "threads": torch.get_num_threads()}
    return out


def _targets(ratios: dict[str, Any], default_mode: str) -> dict[str, bool]:
    t: dict[str, bool] = {"analytic_not_slower_than_autograd": ratios["speedup_analytic_vs_autograd"] >= 1.0}
    if "peak_mem_analytic_over_autograd" in ratios:
        t["mem_ratio<=0.5"] = ratios["peak_mem_analytic_over_autograd"] <= 0.5
    key = f"speed_{default_mode}_over_xla"
    if key in ratios:
        t["default>=1.0x_xla"] = ratios[key] >= 1.0
        t["default>=1.3x_xla(stretch)"] = ratios[key] >= 1.3
    return t


run_core_bench = run_core  # the earlier name
