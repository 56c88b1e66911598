"""The JAX/XLA peer computes the same training step as etbench's torch step (float64, same start point)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")

from etbench.bench.common import make_problem  # noqa: E402
from etbench.bench.core import make_xla_step, step_closure  # noqa: E402
from etbench.models.et_config import ETConfig  # noqa: E402
from etbench.peers import xla_et  # noqa: E402

SMALL = {"dim": 16, "heads": 2, "head_dim": 8, "memories": 40, "steps": 3}
BATCH, TOKENS = 3, 7


def _torch_step(cfg: ETConfig) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial params, loss, grads and params after the bench's own step closure, in float64."""
    model, opt, x, target = make_problem(cfg, BATCH, TOKENS, "cpu", seed=3, dtype=torch.float64)
    start = xla_et.params_from_module(model)
    names = xla_et.grad_names()
    grads: dict[str, np.ndarray] = {}

    def keep_grads(_opt: torch.optim.Optimizer, _a: object, _k: object) -> None:
        params = dict(model.named_parameters())
        grads.update({j: params[t].grad.detach().numpy().copy() for j, t in names.items()
                      if t in params and params[t].grad is not None})

    opt.register_step_pre_hook(keep_grads)
    loss = step_closure(model, opt, x, target)()
    after = xla_et.params_from_module(model)
    return loss, grads, start, after | {"_x": x.numpy(), "_target": target.numpy()}


@pytest.mark.parametrize(("mode", "variant"), [
    ("analytic", {}), ("autograd", {}), ("analytic", {"self_attention": False, "hn_kind": "softmax"}),
    ("autograd", {"terms": "hn"}),
])
def test_jax_step_matches_torch_step_float64(mode: str, variant: dict) -> None:
    cfg = ETConfig(**SMALL, grad_mode=mode, **variant)
    loss_t, grads_t, start, after_t = _torch_step(cfg)
    x, target = after_t.pop("_x"), after_t.pop("_target")
    _, opt, _, _ = make_problem(cfg, BATCH, TOKENS, "cpu", seed=3, dtype=torch.float64)
    spec = xla_et.StepSpec.from_torch(cfg, opt)
    with jax.enable_x64(True):
        loss_j, grads_j, after_j = xla_et.loss_and_grads(spec, start, x, target)
    assert after_j["delta"].dtype == np.float64
    assert loss_j == pytest.approx(loss_t, rel=1e-10)
    assert set(grads_j) == set(grads_t)
    for name, g in grads_t.items():
        assert np.abs(g).max() > 0, name  # every parameter gets a gradient, so the comparison is not vacuous
        np.testing.assert_allclose(grads_j[name], g, rtol=1e-8, atol=1e-12 * np.abs(g).max(), err_msg=name)
        np.testing.assert_allclose(after_j[name], after_t[name], rtol=1e-10, atol=1e-14, err_msg=name)
    for name in set(after_t) - set(after_j):  # unused by the energy: torch's AdamW leaves them alone
        np.testing.assert_array_equal(after_t[name], start[name])


def test_jax_step_detects_a_different_computation() -> None:
    """The oracle has teeth: a different α gives a visibly different loss."""
    cfg = ETConfig(**SMALL)
    loss_t, _, start, after_t = _torch_step(cfg)
    _, opt, _, _ = make_problem(cfg, BATCH, TOKENS, "cpu", seed=3, dtype=torch.float64)
    spec = xla_et.StepSpec.from_torch(cfg.model_copy(update={"alpha": 0.11}), opt)
    with jax.enable_x64(True):
        loss_j, _, _ = xla_et.loss_and_grads(spec, start, after_t["_x"], after_t["_target"])
    assert abs(loss_j - loss_t) > 1e-6 * abs(loss_t)


def test_xla_step_runs_the_bench_problem_in_float32() -> None:
    """The bench's compiled step: float32, losses of successive AdamW steps match torch's to float32 noise."""
    cfg = ETConfig(**SMALL)
    xla = make_xla_step(cfg, BATCH, TOKENS, "cpu")
    torch_step = step_closure(*make_problem(cfg, BATCH, TOKENS, "cpu"))
    for _ in range(3):
        assert xla() == pytest.approx(torch_step(), rel=1e-4)
    assert xla.params["wq"].dtype == np.float32
    assert xla.cost_flops() is None or xla.cost_flops() > 0


def test_unknown_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="device must be"):
        xla_et.jax_device("tpu")
