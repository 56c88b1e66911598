"""Peak memory of one trial's training step — the model's memory, not the process's.

GPU: ``torch.cuda.max_memory_allocated`` over the trial's first training step, its peak reset right before the
step and read right after it — the same quantity as on CPU. (Before, it was read at the end of the trial: the peak
over training, every evaluation's full-model copy and ZeRO-3's gathers, under the label "train-step peak"; the
cluster-2 review, finding 8.) The whole trial's GPU peak is reported separately as ``trial_peak_mem_mb``.

CPU: the peak of live tensor bytes during the trial's first training step (forward, backward, optimizer step),
counted in-process by a ``TorchDispatchMode`` that adds each new storage an op creates and subtracts it when the
storage is freed, on top of the model state alive when the step starts (parameters, buffers, gradients, optimizer
state). The first step is the costly one (it creates gradients and the optimizer state) and tracking one step
keeps the overhead to one step per trial. Every trial builds a fresh :class:`StepMemory`, so a Ray Tune actor
reused across trials (``reuse_actors=True``) never carries one trial's peak into the next.

The process's peak RSS is a different number (interpreter, libraries, data, allocator caches) and is reported
separately as ``process_peak_rss_mb``, with its high-water mark reset at the start of the trial where Linux allows.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 2**20


def _dense_parts(t: Tensor) -> tuple[Tensor, ...]:
    """The strided tensors holding ``t``'s data (a sparse CSR/COO tensor's indices and values)."""
    if t.layout == torch.strided:
        return (t,)
    if t.layout == torch.sparse_csr:
        return t.crow_indices(), t.col_indices(), t.values()
    if t.layout == torch.sparse_coo:
        return t._indices(), t._values()
    return ()


def _storages(tensors: Iterable[Any]) -> Iterator[torch.UntypedStorage]:
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            for part in _dense_parts(t):
                yield part.untyped_storage()


class LiveTensorBytes(TorchDispatchMode):
    """Running and peak bytes of the distinct tensor storages alive, from ``baseline`` plus every op's outputs."""

    observes_any_op = True  # counts whatever op runs (oneDNN GEMMs included): kernels are chosen as without it

    def __init__(self, baseline: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []
        self._before: set[int] = set()
        for storage in _storages(baseline):
            self._add(storage)

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key == 0 or key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def close(self) -> None:
        """Stop following the storages (the model's own live on after the step)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()
        self._live.clear()
        self._before.clear()

    def _known(self, storage: torch.UntypedStorage) -> None:
        """A storage that existed before the step without being state (a data tensor, a comm buffer): an op that
        returns a view of it allocates nothing."""
        key = storage.data_ptr()
        if key and key not in self._live and key not in self._before:
            self._before.add(key)
            self._finalizers.append(weakref.finalize(storage, self._before.discard, key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for storage in _storages(tree_leaves((args, kwargs))):
            self._known(storage)
        out = func(*args, **kwargs)
        for storage in _storages(out if isinstance(out, tuple | list) else (out,)):
            if storage.data_ptr() not in self._before:
                self._add(storage)
        return out


def state_tensors(model: torch.nn.Module, optimizer: Any = None) -> list[Tensor]:
    """Parameters, buffers, gradients and (a torch optimizer's) state tensors: what a step starts from."""
    out: list[Tensor] = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    for group in getattr(optimizer, "param_groups", []):  # e.g. ZeRO's fp32 partitions the model does not hold
        out += [p for p in group.get("params", []) if isinstance(p, Tensor)]
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        out += [v for s in state.values() if isinstance(s, dict) for v in s.values() if isinstance(v, Tensor)]
    return out


def _reset_process_peak() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (MiB); NaN where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


class StepMemory:
    """Peak training-step memory of one trial (see the module docstring); build one per trial."""

    def __init__(self, device: torch.device, state: Callable[[], Iterable[Tensor]] = tuple) -> None:
        self.device, self._state = device, state
        self._peak_bytes: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_reset = _reset_process_peak()

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Wrap one training step; the first wrapped step is measured, later ones run untouched."""
        if self._peak_bytes is not None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # the step's own peak, not the setup's
            yield
            torch.cuda.synchronize(self.device)
            self._peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        tracker = LiveTensorBytes(self._state())
        try:
            with tracker:
                yield
            self._peak_bytes = tracker.peak
        finally:
            tracker.close()

    def peak_mb(self) -> float:
        """The measured training step's peak (MiB); NaN when no step was measured."""
        return float("nan") if self._peak_bytes is None else self._peak_bytes / MiB

    def costs(self) -> dict[str, float]:
        """The summary's memory cost columns."""
        out = {"peak_mem_mb": self.peak_mb(),
               "process_peak_rss_mb": process_peak_rss_mb() if self.rss_reset else float("nan")}
        if self.device.type == "cuda":  # since the measured step: later steps, evaluations, the final gather
            out["trial_peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / MiB
        return out
