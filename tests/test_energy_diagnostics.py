"""Per-step diagnostics of every energy trace (issue 24.1): ‖∂E/∂g‖ per token (mean, max), the relative update
‖Δx‖/‖x‖ and the fixed-point step — against autograd and the descent's own tokens."""

from __future__ import annotations

import torch

from etbench.models.energy import FIXED_POINT_TOL, EnergyTrace, EnergyTransformer
from etbench.models.et_config import ETConfig
from etbench.tracking import schema


def test_trace_diagnostics_match_autograd_and_the_tokens() -> None:
    torch.manual_seed(0)
    et = EnergyTransformer(ETConfig(dim=16, heads=2, head_dim=8, memories=32)).double()
    x0 = torch.randn(3, 5, 16, dtype=torch.float64)
    steps, alpha = 4, 0.3
    _, tr = et.descend(x0, steps=steps, alpha=alpha)
    assert tr is not None and tr.grad_norm_mean is not None and tr.grad_norm_max is not None
    assert tr.rel_update is not None
    assert tr.grad_norm_mean.shape == tr.E.shape == (3, steps + 1) and tr.rel_update.shape == (3, steps)
    x = x0
    for t in range(steps + 1):
        g = et.norm(x).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(et.energy(g).E.sum(), g)
        per_token = grad.norm(dim=-1)  # (samples, tokens)
        torch.testing.assert_close(tr.grad_norm_mean[:, t], per_token.mean(-1))
        torch.testing.assert_close(tr.grad_norm_max[:, t], per_token.amax(-1))
        if t < steps:
            nxt = (x - alpha * grad).detach()
            rel = (nxt - x).flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1)
            torch.testing.assert_close(tr.rel_update[:, t], rel)
            x = nxt


def test_fixed_point_step_is_the_first_update_below_tolerance() -> None:
    e = torch.zeros(2, 4, dtype=torch.float64)
    rel = torch.tensor([[0.5, 1e-4, 0.2], [0.5, 0.1, 0.01]], dtype=torch.float64)
    tr = EnergyTrace(e, e, e, rel, rel_update=rel, grad_norm_mean=e, grad_norm_max=e)
    assert tr.fixed_point_step().tolist() == [1, -1]
    assert tr.fixed_point_step(tol=0.05).tolist() == [1, 2]
    assert tr.mean_fixed_point_step() is None and tr.mean_fixed_point_step(tol=0.06) == 1
    rows = tr.rows()
    assert [r["fixed_point_step"] for r in rows] == [1] * 4 + [""] * 4
    assert set(schema.ENERGY_TRACE_DIAGNOSTICS) <= set(rows[0]) and rows[3]["rel_update"] != rows[3]["rel_update"]
    old = EnergyTrace(e, e, e, rel)  # a trace without diagnostics (older callers) still writes every column
    assert old.fixed_point_step().tolist() == [-1, -1] and old.rows()[0]["fixed_point_step"] == ""


def test_fixed_point_tolerance_is_the_same_for_writer_and_reader() -> None:
    assert FIXED_POINT_TOL == schema.FIXED_POINT_TOL
