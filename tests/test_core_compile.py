"""The torch.compile lever of `bench core`: the analytic step traces to one graph with no breaks, is not
recompiled when called again, and computes the eager step's loss and parameter gradients."""

from __future__ import annotations

import pytest
import torch

from etbench.bench.common import make_problem
from etbench.bench.core_compile import CompiledStep, explain_mode, forward_loss
from etbench.models.et_config import ETConfig

CFG = ETConfig(dim=16, heads=2, head_dim=8, memories=32, steps=3)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo as dynamo

    dynamo.reset()
    yield
    dynamo.reset()


def _eager_grads(cfg: ETConfig) -> tuple[float, dict[str, torch.Tensor]]:
    model, _, x, target = make_problem(cfg, 2, 5, "cpu")
    loss = forward_loss(model)(x, target)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_analytic_step_is_one_graph_and_matches_eager() -> None:
    eager_loss, eager_grads = _eager_grads(CFG)
    step = CompiledStep(CFG, batch=2, tokens=5)
    assert step.info["graphs"] == 1 and step.info["graph_breaks"] == 0, step.info["break_reasons"]
    assert step.info["compile_s"] > 0 and step.info["frames_compiled_first_call"] >= 1
    assert step.first_loss == pytest.approx(eager_loss, rel=1e-5)
    for _ in range(2):
        step()
    assert step.recompiles() == 0
    # gradients: the same forward compiled on a fresh copy of the problem (CompiledStep's first call already
    # took an AdamW step), against the eager ones
    model, _, x, target = make_problem(CFG, 2, 5, "cpu")
    compiled = torch.compile(forward_loss(model))
    compiled(x, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_autograd_mode_breaks_the_graph_at_autograd_grad() -> None:
    rep = explain_mode(CFG.model_copy(update={"grad_mode": "autograd"}), 2, 5)
    assert rep["graph_breaks"] > 0
    assert any("autograd.grad" in r for r in rep["break_reasons"]), rep
