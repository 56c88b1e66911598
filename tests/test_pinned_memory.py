"""Peak memory of the training step (CPU: live tensor bytes, in-process), pinned against hand-counted bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from etbench.config import resolve_run_config
from etbench.engine.memory import LiveTensorBytes, StepMemory, process_peak_rss_mb, state_tensors
from etbench.engine.run import run_single

MiB = 2**20


def test_live_tensor_bytes_by_hand() -> None:
    base = torch.zeros(1024, 256)  # 1 MiB alive before
    with LiveTensorBytes([base, base[:3]]) as t:  # a view of the same storage counts once
        a = torch.ones(2048, 256)  # 2 MiB → 3
        b = a * 2  # 2 MiB → 5 (the peak)
        del a, b  # → 1
        c = base + 1  # 1 MiB → 2
        _ = c[:10]  # a view: no new storage
        c.add_(1)  # in place: no new storage
        current = t.current
    assert t.peak == 5 * MiB and current == 2 * MiB
    t.close()
    data = torch.randn(4096, 256)  # 4 MiB that existed before the step but is not model state (a dataset)
    with LiveTensorBytes() as t:
        rows = data[:2048]  # a view of it allocates nothing
        picked = rows * 1  # a copy of half of it: 2 MiB
    assert t.peak == 2 * MiB and picked.shape == (2048, 256)
    t.close()


def _step(memory: StepMemory, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    with memory.measure():
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_training_step_peak_counts_params_grads_and_optimizer_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512, bias=False)  # W: 1 MiB
    x = torch.randn(16, 512)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)  # updates in place: W + gradient + activations only
    memory = StepMemory(torch.device("cpu"), lambda: state_tensors(model, sgd))
    _step(memory, model, sgd, x)
    activations = 4 * 16 * 512 * 4 / MiB  # output, its square, their gradients: 32 KiB each
    assert 2.0 <= memory.peak_mb() <= 2.0 + activations + 0.01, memory.peak_mb()
    first = memory.peak_mb()
    _step(memory, model, sgd, x)  # later steps are not tracked: the first step's peak stays the trial's number
    assert memory.peak_mb() == first

    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory = StepMemory(torch.device("cpu"), lambda: state_tensors(model, adam))
    _step(memory, model, adam, x)
    # + exp_avg and exp_avg_sq (created by the first step: 4 MiB in all) + at most two W-sized temporaries
    assert 4.0 <= memory.peak_mb() <= 6.0 + activations + 0.01, memory.peak_mb()
    again = StepMemory(torch.device("cpu"), lambda: state_tensors(model, adam))  # a new trial: measured afresh
    _step(again, model, adam, x)  # the moments already exist and count as the state the step starts from
    assert 4.0 <= again.peak_mb() <= 6.0 + activations + 0.01
    assert process_peak_rss_mb() > 10 * again.peak_mb()  # the process (interpreter, libraries) is far larger


def _cfg(memories: int) -> object:
    return resolve_run_config({
        "task": {"dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "model": {"et": {"steps": 2, "memories": memories}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0, "eval_trace_samples": 2},
    })


def test_run_summary_reports_step_memory_per_trial(tmp_path: Path) -> None:
    """Two trials in one process (as in a reused Tune actor) get the same step peak; more memories, more bytes;
    the process's RSS is its own, plainly named column."""
    runs = [run_single(_cfg(m), tmp_path / f"r{i}", progress=False) for i, m in enumerate((64, 64, 512))]
    costs = [json.loads((r.out / "summary.json").read_text())["cost"] for r in runs]
    small, same, big = (c["peak_mem_mb"] for c in costs)
    assert small == same, (small, same)  # nothing carried over from the first trial
    params_mb = costs[0]["params"] * 4 / MiB
    assert small >= 4 * params_mb  # parameters, gradients and the two AdamW moments at least
    assert big > small
    assert costs[0]["process_peak_rss_mb"] > 10 * small  # RSS is the process, not the model


def test_sparse_outputs_count_their_indices_and_values() -> None:
    dense = torch.eye(512)  # 1 MiB, before the step
    with LiveTensorBytes() as t:
        csr = dense.to_sparse_csr()  # 513 row pointers + 512 columns (int64) + 512 values (float32)
        held = t.current
    parts = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
             for p in (csr.crow_indices(), csr.col_indices(), csr.values())}
    assert held == sum(parts.values()) >= 513 * 8 + 512 * 8 + 512 * 4  # storages held (columns may sit in a
    # larger index buffer of the conversion)
    assert t.peak >= held  # plus the conversion's temporaries
    t.close()


def test_gpu_peak_is_the_first_steps_not_the_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the peak is reset right before the measured step and read right after it (cluster-2 finding 8):
    the setup before it and the evaluations after it (a full-model copy, ZeRO-3 gathers) no longer count as the
    "train-step peak"; the whole trial's peak is its own column. A fake allocator stands in for the GPU."""
    class FakeAllocator:
        def __init__(self) -> None:
            self.now, self.peak = 0, 0

        def alloc(self, n: int) -> None:
            self.now += n
            self.peak = max(self.peak, self.now)

        def reset(self, device: Any = None) -> None:
            self.peak = self.now

    gpu = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", gpu.reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: gpu.peak)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    memory = StepMemory(torch.device("cuda"))
    gpu.alloc(100 * 2**20)  # model state, resident through the step
    gpu.alloc(500 * 2**20)  # a setup transient, freed before training
    gpu.alloc(-500 * 2**20)
    with memory.measure():
        gpu.alloc(50 * 2**20)  # the step's activations and gradients
        gpu.alloc(-50 * 2**20)
    with memory.measure():  # later steps are not measured again
        gpu.alloc(70 * 2**20)
        gpu.alloc(-70 * 2**20)
    gpu.alloc(900 * 2**20)  # an evaluation's full fp32 copy
    costs = memory.costs()
    assert costs["peak_mem_mb"] == 150.0  # state + the first step, nothing else (the old code read 600 here)
    assert costs["trial_peak_mem_mb"] == 1000.0  # since the step: the evaluation's copy included
