"""fp32 GEMMs of the closed-form ET gradients, routed to the fastest full-precision backend on this CPU.

On the AMD EPYC (AVX-512) machines etbench runs on, torch's ``aten::mm`` goes to MKL, which takes a slower code path
on non-Intel CPUs (≈ 212 GFLOP/s at the ET step's shapes); oneDNN, reached through
``torch.ops.mkldnn._linear_pointwise`` on ordinary dense tensors, runs the same fp32 GEMM at full precision with
AVX-512 (`etbench bench core` records both rates and the whole-step A/B in its JSON, which is how the default below
was chosen). The oneDNN path has no autograd formula, so it is used only where nothing records a graph through it:
inside the memory-lean ``autograd.Function``s (``lean_grads``) and in no-grad inference. Everything else — CUDA,
other dtypes, tensors that need grad — goes to ``torch.matmul``.

Backend: ``ETBENCH_CPU_GEMM`` = ``onednn`` (default) | ``aten``, or :func:`use_backend` in code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("onednn", "aten")
_ENV = "ETBENCH_CPU_GEMM"


def _initial_backend() -> str:
    name = os.environ.get(_ENV, "onednn").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r}: allowed values are {', '.join(BACKENDS)}")
    return name


_backend = _initial_backend()
_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def backend() -> str:
    """The CPU fp32 GEMM backend in use: ``onednn`` (when this torch build has it) or ``aten``."""
    return _backend if _HAS_ONEDNN else "aten"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given CPU GEMM backend (``onednn`` or ``aten``)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"CPU GEMM backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _onednn_ok(x: Tensor, w: Tensor) -> bool:
    return (
        _backend == "onednn" and _HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
        and w.dtype == torch.float32 and w.dim() == 2 and x.dim() >= 2
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        # under torch.compile inductor picks the GEMM (it cannot lower oneDNN's linear with a non-constant
        # weight); FlopCounterMode & co. see the aten GEMMs they know how to count; a mode that only observes
        # (``observes_any_op``, e.g. the step-memory probe) must not change which kernel runs, or a measured
        # step would compute different bits
        and not torch.compiler.is_compiling() and _mode_allows_onednn()
    )


def _mode_allows_onednn() -> bool:
    mode = _get_current_dispatch_mode()
    return mode is None or bool(getattr(mode, "observes_any_op", False))


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x (…, K) @ wᵀ for w (N, K), the layout of ``F.linear``'s weight; w may be a transposed view."""
    if _onednn_ok(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x @ w.T


def mm(x: Tensor, w: Tensor) -> Tensor:
    """x (…, K) @ w for w (K, N)."""
    return linear(x, w.T)


def mm_tn(a: Tensor, b: Tensor) -> Tensor:
    """aᵀ b for a (R, M), b (R, D): the weight-gradient GEMM, contracting over the rows of both. Returns (M, D).

    Always ``aten`` (BLAS reads aᵀ through its transpose flag): oneDNN's linear contracts over the last dim of
    its input, so it needed a transposed copy of b per call, and the bench step measured 3.5 % faster with this
    GEMM on aten and the others on oneDNN (0.790 vs 0.818 s, interleaved, quiet machine; all-aten 0.861 s;
    docs/bench_core.md).
    """
    return a.T @ b
