"""The `torch.compile` lever of `etbench bench core`: the same training step with its forward (T descent steps +
loss) compiled by TorchDynamo/Inductor, AOTAutograd compiling the backward.

It reports what a decision on the lever needs: whether the step traces to one graph (``graph_breaks`` must be 0),
whether timing it recompiles (``recompiles`` must be 0: one graph for every call at a fixed shape, the T-step
loop unrolled into it), the one-off compile seconds, and the break-even number of steps the speed-up has to
repay them in. The compiled step must compute the eager one's loss (``loss_rel_diff``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from etbench.bench.common import make_problem
from etbench.models.et_config import ETConfig


def forward_loss(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The step's forward: T descent steps of ``model`` (no trace) and the MSE loss against the target."""

    def fn(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model.descend(x, trace=False)[0], target)

    return fn


def trace_report(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Graphs and break reasons of ``fn(*args)`` under TorchDynamo (a dry trace, nothing compiled)."""
    import torch._dynamo as dynamo

    ex = dynamo.explain(fn)(*args)
    dynamo.reset()
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0][:200] for b in ex.break_reasons})}


class CompiledStep:
    """One bench training step with the forward + loss under ``torch.compile``; call to run a step.

    Construction compiles it (the first call, timed in ``info['compile_s']``) after taking the eager forward's
    loss on the same parameters and inputs as the oracle (``info['loss_rel_diff']``).
    """

    def __init__(self, cfg: ETConfig, batch: int, tokens: int, device: str = "cpu", seed: int = 0,
                 explain: bool = True) -> None:
        self.model, self.opt, self.x, self.target = make_problem(cfg, batch, tokens, device, seed)
        eager = forward_loss(self.model)
        self.info: dict[str, Any] = {"backend": "inductor", "grad_mode": cfg.grad_mode, "steps": cfg.steps}
        if explain:
            self.info.update(trace_report(eager, self.x, self.target))
        with torch.no_grad():
            eager_loss = float(eager(self.x, self.target))
        self.compiled = torch.compile(eager, backend="inductor")
        frames_before = _frames_compiled()
        t0 = time.perf_counter()
        self.first_loss = self()
        self.info["compile_s"] = time.perf_counter() - t0  # first call: trace + Inductor codegen + one step
        self._frames_after_first = _frames_compiled()
        self.info["frames_compiled_first_call"] = self._frames_after_first - frames_before
        self.info["loss_rel_diff"] = abs(self.first_loss - eager_loss) / max(abs(eager_loss), 1e-30)

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.compiled(self.x, self.target)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def recompiles(self) -> int:
        """Frames compiled since the first call (0: every timed call reused the first graph)."""
        return _frames_compiled() - self._frames_after_first

    def report(self, results: dict[str, Any], mode: str, name: str) -> dict[str, Any]:
        """The lever's verdict inputs: speed-up over the eager ``mode`` (results key ``name`` is this step),
        recompiles while timed, break-even steps for the compile cost."""
        eager, compiled = results[mode]["median_s"], results[name]["median_s"]
        saved = eager - compiled
        return {**self.info, "recompiles": self.recompiles(), "eager_median_s": eager,
                "compiled_median_s": compiled, "speedup_over_eager": eager / compiled,
                "break_even_steps": (self.info["compile_s"] - compiled) / saved if saved > 0 else None}


def _frames_compiled() -> int:
    """Python frames TorchDynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def explain_mode(cfg: ETConfig, batch: int, tokens: int, device: str = "cpu") -> dict[str, Any]:
    """:func:`trace_report` of another gradient mode's step forward."""
    model, _, x, target = make_problem(cfg, batch, tokens, device)
    return trace_report(forward_loss(model), x, target)
