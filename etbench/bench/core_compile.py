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

from etbench.bench.core import make_problem
from etbench.models.et_config import ETConfig


class CompiledStep:
    """One bench training step with the forward + loss under ``torch.compile``; call to run a step."""

    def __init__(self, cfg: ETConfig, batch: int, tokens: int, device: str = "cpu", seed: int = 0,
                 explain: bool = True) -> None:
        import torch._dynamo as dynamo

        self.model, self.opt, self.x, self.target = make_problem(cfg, batch, tokens, device, seed)
        model = self.model

        def forward_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = model.descend(x, trace=False)[0]
            return torch.nn.functional.mse_loss(out, target)

        self.eager = forward_loss
        self.info: dict[str, Any] = {"backend": "inductor", "grad_mode": cfg.grad_mode, "steps": cfg.steps}
        if explain:  # a dry trace (no compilation) that lists graphs and break reasons
            ex = dynamo.explain(forward_loss)(self.x, self.target)
            self.info.update(graphs=ex.graph_count, graph_breaks=ex.graph_break_count,
                             break_reasons=[str(b.reason)[:300] for b in ex.break_reasons])
            dynamo.reset()
        self.compiled = torch.compile(forward_loss, backend="inductor")
        frames_before = _frames_compiled()
        t0 = time.perf_counter()
        self.first_loss = self()
        self.info["compile_s"] = time.perf_counter() - t0  # first call: trace + Inductor codegen + one step
        self._frames_after_first = _frames_compiled()
        self.info["frames_compiled_first_call"] = self._frames_after_first - frames_before

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.compiled(self.x, self.target)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def recompiles(self) -> int:
        """Frames compiled since the first call (0: every timed call reused the first graph)."""
        return _frames_compiled() - self._frames_after_first


def _frames_compiled() -> int:
    """Python frames TorchDynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def explain_mode(cfg: ETConfig, batch: int, tokens: int, device: str = "cpu") -> dict[str, Any]:
    """Graphs and break reasons of another mode's forward under TorchDynamo (a dry trace, nothing compiled)."""
    import torch._dynamo as dynamo

    model, _, x, target = make_problem(cfg, batch, tokens, device)

    def forward_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model.descend(x, trace=False)[0], target)

    ex = dynamo.explain(forward_loss)(x, target)
    dynamo.reset()
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "break_reasons": sorted({str(b.reason).splitlines()[0][:200] for b in ex.break_reasons})}


def compiled_runner(cfg: ETConfig, batch: int, tokens: int, device: str = "cpu",
                    ) -> tuple[Callable[[], float], dict[str, Any]]:
    """The compiled step (already compiled: its first call is in ``info['compile_s']``) and its trace report,
    with the eager step's loss on the same parameters and inputs as the oracle."""
    eager_model, _, x, target = make_problem(cfg, batch, tokens, device)
    with torch.no_grad():
        eager_loss = float(torch.nn.functional.mse_loss(eager_model.descend(x, trace=False)[0], target))
    step = CompiledStep(cfg, batch, tokens, device)
    step.info["loss_rel_diff"] = abs(step.first_loss - eager_loss) / max(abs(eager_loss), 1e-30)
    return step, step.info


def compile_report(info: dict[str, Any], step: CompiledStep, results: dict[str, Any], mode: str, name: str,
                   ) -> dict[str, Any]:
    """The lever's verdict inputs: speed-up over the eager default, recompiles while timed, break-even steps."""
    eager, compiled = results[mode]["median_s"], results[name]["median_s"]
    saved = eager - compiled
    out = {**info, "recompiles": step.recompiles(), "eager_median_s": eager, "compiled_median_s": compiled,
           "speedup_over_eager": eager / compiled,
           "break_even_steps": (info["compile_s"] - compiled) / saved if saved > 0 else None}
    return out
