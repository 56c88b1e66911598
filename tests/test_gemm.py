"""The oneDNN GEMM route of the closed-form gradients: full fp32 precision, same training gradients, counted FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from etbench.models import gemm
from etbench.models.energy import EnergyTransformer
from etbench.models.et_config import ETConfig

needs_onednn = pytest.mark.skipif(not gemm._HAS_ONEDNN, reason="this torch build has no oneDNN linear")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@needs_onednn
def test_onednn_gemms_are_full_fp32_and_run_onednn() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w, a = (torch.randn(s, generator=gen) for s in ((3, 50, 64), (96, 64), (150, 96)))
    with gemm.use_backend("onednn"), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = {"linear": gemm.linear(x, w), "mm": gemm.mm(x, w.T), "mm_tn": gemm.mm_tn(a, x.reshape(150, 64))}
    assert any("_linear_pointwise" in e.key for e in prof.key_averages())
    ref_lin = x.double() @ w.double().T
    refs = {"linear": ref_lin, "mm": ref_lin, "mm_tn": a.double().T @ x.reshape(150, 64).double()}
    for name, ref in refs.items():
        assert got[name].shape == ref.shape
        assert _rel(got[name], ref) < 1e-6, name  # bf16/tf32 rounding would give ~1e-3


def test_tensors_that_need_grad_fall_back_to_aten() -> None:
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8)
    with gemm.use_backend("onednn"):
        y = gemm.linear(x, w)
    y.sum().backward()  # the oneDNN op has no derivative: this only works on the aten route
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 8))


def _step_grads(mode: str, dtype: torch.dtype, backend: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    cfg = ETConfig(dim=32, heads=2, head_dim=16, memories=96, steps=4, grad_mode=mode, attn_init_std=0.05,
                   mem_init_std=0.05)
    et = EnergyTransformer(cfg).to(dtype).train()
    x, target = torch.randn(3, 9, 32).to(dtype), torch.randn(3, 9, 32).to(dtype)
    with gemm.use_backend(backend):
        torch.nn.functional.mse_loss(et(x), target).backward()
    return {n: p.grad.double() for n, p in et.named_parameters()}


@needs_onednn
def test_float32_training_gradients_on_onednn_match_float64_autograd() -> None:
    ref = _step_grads("autograd", torch.float64, "aten")
    for backend in ("onednn", "aten"):
        got = _step_grads("analytic", torch.float32, backend)
        for name, r in ref.items():
            assert _rel(got[name], r) < 2e-4, (backend, name)


def test_flop_counter_sees_the_gemms_on_either_backend() -> None:
    cfg = ETConfig(dim=32, heads=2, head_dim=16, memories=96, steps=2)
    et = EnergyTransformer(cfg).train()
    x = torch.randn(2, 9, 32)
    counts = {}
    for backend in gemm.BACKENDS:
        with gemm.use_backend(backend), FlopCounterMode(display=False) as fc:
            et(x).sum().backward()
        counts[backend] = fc.get_total_flops()
    assert counts["onednn"] == counts["aten"] > 0


def test_bad_backend_names_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETBENCH_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="ETBENCH_CPU_GEMM='mkl': allowed values are onednn, aten"):
        gemm._initial_backend()
    with pytest.raises(ValueError, match="must be one of onednn, aten"), gemm.use_backend("blas"):
        pass
