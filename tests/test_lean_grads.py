"""The memory-lean autograd Functions against finite differences and plain autograd, and what they keep.

The analytic training step saves, per descent step, the LayerNorm's x̂ and rstd, g, the Hopfield activations and
[Q; K] (issue 15: the backward reuses them instead of recomputing); these tests pin both the gradients and that
bound on what is kept.
"""

from __future__ import annotations

import torch
from torch.autograd import gradcheck

from etbench.models.energy import EnergyLayerNorm, EnergyTransformer
from etbench.models.et_config import ETConfig
from etbench.models.lean_grads import AttentionGrad, HopfieldReluGrad, HopfieldSoftmaxGrad, LayerNormGrad

torch.manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_layernorm_function_matches_finite_differences_and_plain_formula() -> None:
    x, gamma, delta = _rand(3, 4, 6), torch.tensor(1.3, dtype=torch.float64, requires_grad=True), _rand(6)
    assert gradcheck(lambda a, b, c: LayerNormGrad.apply(a, b, c, 1e-5), (x, gamma, delta))
    u = torch.randn(3, 4, 6, dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    plain = gamma * xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5) + delta
    ref = torch.autograd.grad((plain * u).sum(), (x, gamma, delta))
    got = torch.autograd.grad((LayerNormGrad.apply(x, gamma, delta, 1e-5) * u).sum(), (x, gamma, delta))
    torch.testing.assert_close(plain, LayerNormGrad.apply(x, gamma, delta, 1e-5), rtol=1e-12, atol=1e-12)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_layernorm_module_clamps_gamma_in_both_paths() -> None:
    ln = EnergyLayerNorm(6).double()
    with torch.no_grad():
        ln.gamma.fill_(-0.5)  # clamped to GAMMA_MIN: no gradient reaches γ
    x = _rand(2, 6)
    ln(x).sum().backward()
    assert ln.gamma.grad is not None and float(ln.gamma.grad) == 0.0
    with torch.no_grad():
        torch.testing.assert_close(ln(x), LayerNormGrad.apply(x, ln.effective_gamma(), ln.delta, ln.eps))


def test_hopfield_and_attention_functions_match_finite_differences() -> None:
    g, xi = _rand(2, 5, 4), _rand(7, 4)
    assert gradcheck(HopfieldReluGrad.apply, (g, xi))
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(HopfieldSoftmaxGrad.apply, (g, xi, beta))
    wq, wk = _rand(2, 3, 4), _rand(2, 3, 4)
    allowed = torch.rand(2, 1, 5, 5) < 0.6
    allowed[0, 0, 1] = False  # an empty query row
    for mask in (None, allowed):
        assert gradcheck(lambda a, b, c, m=mask: AttentionGrad.apply(a, b, c, 0.5, m), (g, wq, wk))


def test_softmax_beta_gradient_where_probabilities_underflow() -> None:
    """∂L/∂β from Σ core ⊙ log p / β (no h kept) equals autograd's Σ core ⊙ h when most p are exactly 0."""
    g, xi = (300 * torch.randn(2, 5, 4, dtype=torch.float64)).requires_grad_(), _rand(9, 4)
    beta = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 5, 4, dtype=torch.float64)
    p = torch.softmax(beta * (g @ xi.T), -1)
    assert (p == 0).float().mean() > 0.3
    ref = torch.autograd.grad((-(p @ xi) * u).sum(), (g, xi, beta))
    got = torch.autograd.grad((HopfieldSoftmaxGrad.apply(g, xi, beta) * u).sum(), (g, xi, beta))
    for r, q in zip(ref, got, strict=True):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q, r, rtol=1e-9, atol=1e-9)


def _saved_bytes(mode: str, cfg: ETConfig, batch: int, tokens: int) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for one training forward (T descent steps)."""
    torch.manual_seed(1)
    model = EnergyTransformer(cfg.model_copy(update={"grad_mode": mode})).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(batch, tokens, cfg.dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.descend(x, trace=False)[0]
    out.sum().backward()
    return sum(kept.values())


def test_analytic_step_keeps_x_hat_g_activations_and_qk_per_step() -> None:
    cfg = ETConfig(dim=16, heads=2, head_dim=8, memories=40, steps=3)
    batch, tokens = 2, 5
    per_token = cfg.dim + 1 + cfg.dim + cfg.num_memories + 2 * cfg.heads * cfg.head_dim  # x̂, rstd, g, ReLU(gξᵀ), Q, K
    bound = 4 * (batch * tokens * per_token + 1) * cfg.steps  # + the clamped γ (a scalar) per step
    lean = _saved_bytes("analytic", cfg, batch, tokens)
    assert bound * 0.9 <= lean <= bound, (lean, bound)
    assert _saved_bytes("autograd", cfg, batch, tokens) > 1.5 * lean


def test_analytic_training_step_does_the_closed_form_flops() -> None:
    """FlopCounterMode on one training step = the closed form of what the lean forward + backward compute per
    descent step and sample: Hopfield 12·NMD (2 forward, 4 backward GEMMs), attention 24·NDHY (projection and
    read-out forward; P, ∂L/∂g and two weight-gradient GEMMs backward) + 24·HN²Y (scores, ωK, ωᵀQ forward; the same
    recomputed, dω, dQ, dK backward). A recomputation coming back, or an accumulation the counter misses, fails."""
    from torch.utils.flop_counter import FlopCounterMode

    from etbench.bench.core import make_step

    cfg = ETConfig(dim=16, heads=2, head_dim=8, memories=40, steps=3)
    batch, n, d, h, y, m = 2, 5, cfg.dim, cfg.heads, cfg.head_dim, cfg.num_memories
    step = make_step(cfg, batch, n, "cpu")
    with FlopCounterMode(display=False) as counter:
        step()
    per_sample_step = 12 * n * m * d + 24 * n * d * h * y + 24 * h * n * n * y
    assert counter.get_total_flops() == per_sample_step * batch * cfg.steps
