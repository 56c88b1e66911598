"""GPU-only code paths checked on CPU: bf16 DeepSpeed evaluation on fp32 weights, per-rank CUDA RNG state, and the
leftover ``DS_ACCELERATOR=cpu`` refusal (issue 12, point 8)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

from etbench.config import ConfigError, resolve_run_config
from etbench.engine import backend as B
from etbench.engine.ds_backend import _EvalView, check_accelerator, fp32_copy


def _digits_et() -> tuple[nn.Module, Any]:
    from etbench.engine.build import build_model, build_task

    cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits", "limit_train": 16, "limit_eval": 8},
                              "model": {"et": {"steps": 2}}})
    task = build_task(cfg, torch.device("cpu"), input_dtype=torch.bfloat16)  # DeepSpeed bf16 workers' inputs
    return build_model(cfg, task.describe()), task


class _StubBackend:
    """The parts of DeepSpeedBackend that _EvalView uses, around a bf16 'engine' module and its fp32 masters."""

    def __init__(self, bf16_module: nn.Module, masters: dict[str, torch.Tensor]) -> None:
        self.engine, self.net, self.device, self._masters = bf16_module, bf16_module, torch.device("cpu"), masters

    def full_model(self) -> nn.Module:
        return fp32_copy(self.engine, self._masters)

    def eval_autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_evaluation_runs_on_the_fp32_master_weights() -> None:
    model, task = _digits_et()
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}  # fp32: what the optimizer holds
    bf16 = model.to(torch.bfloat16)  # what DeepSpeed trains with
    view = _EvalView(_StubBackend(bf16, masters))
    seen: list[torch.dtype] = []

    def record(mod: nn.Module, args: Any) -> None:
        seen.append(next(mod.parameters()).dtype)

    view.eval()
    assert view.module is not bf16 and all(p.dtype == torch.float32 for p in view.module.parameters())
    for n, p in view.module.named_parameters():  # the exact fp32 values, not the bf16-rounded ones
        assert torch.equal(p, masters[n]), n
    handle = view.module.register_forward_pre_hook(record)
    with torch.no_grad():
        metrics = task.evaluate(view, lambda t: t)
    handle.remove()
    assert seen and set(seen) == {torch.float32} and all(v == v for v in metrics.values())
    # oracle: the same fp32 weights evaluated directly under autocast (how a one-worker GPU run evaluates)
    ref = fp32_copy(bf16, masters).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expect = task.evaluate(ref, lambda t: t)
    assert metrics == pytest.approx(expect, rel=1e-6)
    # and it differs from evaluating the bf16-cast weights themselves
    with torch.no_grad():
        cast = task.evaluate(bf16.eval(), lambda t: t)
    assert any(abs(cast[k] - metrics[k]) > 1e-6 for k in metrics)
    view.train()
    assert view._plain is None and view.module is bf16  # training goes back to the engine


def test_the_energy_trace_works_on_the_fp32_copy_with_bf16_inputs() -> None:
    model, task = _digits_et()
    full = fp32_copy(model.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trace = task.energy_trace(full, 2)
    assert trace is not None and trace.E.dtype == torch.float64 and torch.isfinite(trace.E).all()


# --- RNG: only the rank's own GPU -----------------------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []

    def forbidden(*a: Any, **k: Any) -> None:
        raise AssertionError("touched every visible GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": calls.append(("get", device)) or torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device, state)))
    return calls


def test_rng_state_saves_and_restores_only_the_ranks_device(fake_cuda: list) -> None:
    dev = torch.device("cuda", 1)
    state = B.rng_state(dev)
    assert fake_cuda == [("get", dev)] and torch.equal(state["cuda"], torch.full((8,), 7, dtype=torch.uint8))
    B.set_rng_state(state, dev)
    assert fake_cuda[1][:2] == ("set", dev)
    fake_cuda.clear()
    cpu = B.rng_state(torch.device("cpu"))  # a CPU rank never creates a CUDA context
    B.set_rng_state({**cpu, "cuda": state["cuda"]}, torch.device("cpu"))
    assert "cuda" not in cpu and fake_cuda == []


def test_an_older_all_gpu_rng_list_restores_the_ranks_entry(fake_cuda: list) -> None:
    old = {**B.rng_state(None), "cuda": [torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)]}
    B.set_rng_state(old, torch.device("cuda", 1))
    (_, dev, st), = fake_cuda
    assert dev == torch.device("cuda", 1) and torch.equal(st, torch.ones(8, dtype=torch.uint8))


def test_plain_backend_checkpoint_rng_goes_through_its_device(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real_state, real_set = B.rng_state, B.set_rng_state
    monkeypatch.setattr(B, "rng_state", lambda device=None: seen.append(device) or real_state(device))
    monkeypatch.setattr(B, "set_rng_state", lambda state, device=None: seen.append(device) or real_set(state, device))
    cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}})
    be = B.PlainBackend(nn.Linear(2, 2), cfg.train, 1, torch.device("cpu"))
    be.save(tmp_path / "ck", {"x": 1})
    assert be.load(tmp_path / "ck") == {"x": 1}
    assert seen and all(d == torch.device("cpu") for d in seen)


# --- DS_ACCELERATOR -------------------------------------------------------------------------------------------
def test_a_leftover_cpu_accelerator_is_refused_for_a_gpu_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    gpu = resolve_run_config({"task": {"kind": "image", "dataset": "digits"},
                              "dist": {"workers": 2, "use_gpu": True, "deepspeed": True}})
    with pytest.raises(ConfigError, match=r"DeepSpeed's accelerator in this worker is 'cpu' \(DS_ACCELERATOR=cpu\)"):
        check_accelerator(gpu)
    cpu = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}, "dist": {"workers": 2}})
    assert check_accelerator(cpu) == "cpu"


def test_train_workers_get_the_accelerator_named_explicitly() -> None:
    from etbench.engine.launch import _worker_env

    gpu = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}, "dist": {"workers": 2, "use_gpu": True}})
    cpu = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}, "dist": {"workers": 2}})
    assert _worker_env(gpu)["DS_ACCELERATOR"] == "cuda" and _worker_env(cpu)["DS_ACCELERATOR"] == "cpu"
