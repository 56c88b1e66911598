"""The ET core against independent oracles: naive energies, autograd, the Lagrangian, FLOP counters."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from etbench.models.energy import EnergyLayerNorm, EnergyTransformer
from etbench.models.et_config import ETConfig

SMALL = dict(dim=16, heads=2, head_dim=8, memories=24, attn_init_std=0.3, mem_init_std=0.3)


def make(seed: int = 0, **kw) -> EnergyTransformer:
    torch.manual_seed(seed)
    return EnergyTransformer(ETConfig(**{**SMALL, **kw})).double()


def masks(kind: str, b: int, n: int) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(7)
    if kind == "none":
        return None
    if kind == "padding":
        m = torch.ones(b, n, dtype=torch.bool)
        m[0, -2:] = False
        m[1, -1:] = False
        return m
    m = torch.rand(b, n, n, generator=gen) < 0.6  # random restricted attention; some rows may be empty
    m[0, 1, :] = False
    return m


def naive_attention_energy(et: EnergyTransformer, g: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """E^ATT by explicit loops over samples, heads and queries (float64)."""
    a = et.attn
    out = torch.zeros(g.shape[0], dtype=g.dtype)
    for b, h, c in itertools.product(range(g.shape[0]), range(a.heads), range(g.shape[1])):
        keys = [k for k in range(g.shape[1]) if allowed[b, c, k]]
        if not keys:
            continue
        q = a.wq[h] @ g[b, c]
        logits = torch.stack([a.beta * (q @ (a.wk[h] @ g[b, k])) for k in keys])
        out[b] -= torch.logsumexp(logits, 0) / a.beta
    return out


def allowed_matrix(kind: str, mask: torch.Tensor | None, b: int, n: int, self_attention: bool) -> torch.Tensor:
    if mask is None:
        allowed = torch.ones(b, n, n, dtype=torch.bool)
    elif mask.dim() == 2:
        allowed = mask[:, :, None] & mask[:, None, :]
    else:
        allowed = mask.clone()
    if not self_attention:
        allowed &= ~torch.eye(n, dtype=torch.bool)
    return allowed


@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "pair"])
def test_attention_energy_matches_naive_loops(self_attention: bool, mask_kind: str) -> None:
    et = make(self_attention=self_attention)
    g = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = masks(mask_kind, 3, 6)
    expect = naive_attention_energy(et, g, allowed_matrix(mask_kind, mask, 3, 6, self_attention))
    torch.testing.assert_close(et.attn.energy(g, mask), expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hn_kind", ["relu", "softmax"])
def test_hopfield_energy_matches_formula(hn_kind: str) -> None:
    et = make(hn_kind=hn_kind)
    g = torch.randn(2, 5, 16, dtype=torch.float64)
    h = torch.einsum("bnd,md->bnm", g, et.hn.xi)
    if hn_kind == "relu":
        expect = -0.5 * (h.clamp_min(0) ** 2).sum((1, 2))
    else:
        b = et.hn.beta
        expect = -(torch.log(torch.exp(b * h).sum(-1)) / b).sum(-1)
    torch.testing.assert_close(et.hn.energy(g), expect, rtol=1e-10, atol=1e-10)


COMBOS = list(
    itertools.product([True, False], ["relu", "softmax"], ["attn+hn", "attn", "hn"], ["none", "padding", "pair"])
)


@pytest.mark.parametrize(("self_attention", "hn_kind", "terms", "mask_kind"), COMBOS)
def test_analytic_gradient_equals_autograd(self_attention: bool, hn_kind: str, terms: str, mask_kind: str) -> None:
    et = make(self_attention=self_attention, hn_kind=hn_kind, terms=terms)
    g = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = masks(mask_kind, 3, 6)
    ga, ea = et.energy_grad(g, mask, mode="analytic")
    gb, eb = et.energy_grad(g, mask, mode="autograd")
    rel = (ga - gb).norm() / gb.norm()
    assert rel < 1e-6, f"relative gradient error {rel:.2e}"
    torch.testing.assert_close(ea.E, eb.E, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ea.E, ea.E_att + ea.E_hn)
    if terms == "attn":
        assert torch.all(ea.E_hn == 0)
    if terms == "hn":
        assert torch.all(ea.E_att == 0)


@pytest.mark.parametrize(("hn_kind", "mask_kind"), [("relu", "none"), ("softmax", "padding"), ("relu", "pair")])
def test_parameter_gradients_after_descent_agree(hn_kind: str, mask_kind: str) -> None:
    """What training uses: d loss / d θ through T steps, first-order closed form vs double backward."""
    x0 = torch.randn(3, 6, 16, dtype=torch.float64)
    target = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = masks(mask_kind, 3, 6)
    grads = {}
    for mode in ("analytic", "autograd"):
        et = make(seed=3, hn_kind=hn_kind, grad_mode=mode, steps=5, alpha=0.05).train()
        xin = x0.clone().requires_grad_(True)
        out, _ = et.descend(xin, mask=mask, trace=False)
        ((out - target) ** 2).sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in et.named_parameters()} | {"x0": xin.grad.clone()}
    assert set(grads["analytic"]) >= {"norm.gamma", "norm.delta", "attn.wk", "attn.wq", "hn.xi", "x0"}
    for name, ga in grads["analytic"].items():
        gb = grads["autograd"][name]
        rel = (ga - gb).norm() / gb.norm().clamp_min(1e-30)
        assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def test_layernorm_is_gradient_of_lagrangian_with_scalar_gamma() -> None:
    torch.manual_seed(0)
    ln = EnergyLayerNorm(16).double()
    assert ln.gamma.shape == torch.Size([])
    with torch.no_grad():
        ln.gamma.fill_(1.7)
        ln.delta.normal_()
    x = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ln.lagrangian(x).sum(), x)
    torch.testing.assert_close(ln(x), grad, rtol=1e-10, atol=1e-10)
    # and the normalisation itself: zero mean / unit variance before scale and shift
    with torch.no_grad():
        ln.delta.zero_()
        ln.gamma.fill_(1.0)
    g = ln(x)
    torch.testing.assert_close(g.mean(-1), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g.pow(2).mean(-1), torch.ones(4, 5, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("hn_kind", ["relu", "softmax"])
def test_energy_never_increases_from_spec_init(seed: int, hn_kind: str) -> None:
    torch.manual_seed(seed)
    et = EnergyTransformer(ETConfig(dim=32, heads=4, head_dim=8, hn_kind=hn_kind)).double()  # SPEC §1.5 init
    x = torch.randn(4, 10, 32, dtype=torch.float64)
    _, tr = et.descend(x, steps=12, alpha=0.1)
    assert tr is not None and tr.E.shape == (4, 13) and tr.dx_norm.shape == (4, 12)
    assert not tr.rose().any(), tr.E
    assert tr.rise_fraction() == 0.0
    assert torch.all(tr.E[:, -1] < tr.E[:, 0])  # it actually descends
    assert torch.all(tr.dx_norm > 0)


def test_trace_flags_energy_rises_when_alpha_is_large() -> None:
    """Large steps on an indefinite attention energy overshoot: the trace must say so; small steps do not."""
    torch.manual_seed(0)
    et = EnergyTransformer(ETConfig(dim=8, heads=1, head_dim=8, memories=8, terms="attn", attn_init_std=1.0)).double()
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    _, small = et.descend(x, steps=12, alpha=0.001)
    assert small is not None and not small.rose().any()
    _, big = et.descend(x, steps=12, alpha=10.0)
    assert big is not None and big.rose().any()
    assert 0 < big.rise_fraction() < 1
    rose = big.rose()
    e = big.E
    # a rise is any increase above 8 float64 epsilons of the summed terms' magnitude (EnergyTrace.rose)
    mag = torch.maximum(big.E_att.abs() + big.E_hn.abs(), e.abs())
    noise = 8 * torch.finfo(torch.float64).eps * torch.maximum(mag[:, :-1], mag[:, 1:])
    torch.testing.assert_close(rose, e[:, 1:] - e[:, :-1] > noise)
    rows = big.rows()
    assert len(rows) == 4 * 13 and {"step", "sample", "E", "E_att", "E_hn", "dx_norm", "rose"} <= set(rows[0])
    assert sum(r["rose"] for r in rows) == int(rose.sum())


def test_padding_tokens_do_not_change_real_tokens() -> None:
    """A padded batch gives the real tokens exactly what the unpadded set gives them."""
    et = make(seed=2)
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    pad = torch.cat([x[:, :5], 100 * torch.randn(1, 2, 16, dtype=torch.float64)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 2])
    out_pad, tr_pad = et.descend(pad, steps=4, mask=mask)
    out_ref, tr_ref = et.descend(x[:, :5], steps=4)
    torch.testing.assert_close(out_pad[:, :5], out_ref, rtol=1e-10, atol=1e-10)
    assert tr_pad is not None and tr_ref is not None
    torch.testing.assert_close(tr_pad.E_att, tr_ref.E_att, rtol=1e-10, atol=1e-10)


def test_self_attention_false_is_off_diagonal_pair_mask() -> None:
    g = torch.randn(2, 6, 16, dtype=torch.float64)
    a = make(seed=4, self_attention=False)
    b = make(seed=4, self_attention=True)
    pair = (~torch.eye(6, dtype=torch.bool)).expand(2, 6, 6)
    torch.testing.assert_close(a.attn.energy(g), b.attn.energy(g, pair))


def test_flop_count_matches_torch_flop_counter() -> None:
    cfg = ETConfig(dim=64, heads=4, head_dim=16, memories=256, steps=3)
    torch.manual_seed(0)
    et = EnergyTransformer(cfg)
    n, b = 17, 2
    x = torch.randn(b, n, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        et.descend(x, trace=False)
    measured = counter.get_total_flops() / b
    assert abs(measured - et.flops(n)) / measured < 0.10, (measured, et.flops(n))
    assert et.flops(n) == 3 * et.flops_per_step(n)


def test_parameter_count() -> None:
    cfg = ETConfig(dim=64, heads=4, head_dim=16, mem_ratio=2.0)
    et = EnergyTransformer(cfg)
    assert cfg.num_memories == 128
    assert et.num_parameters() == 1 + 64 + 2 * 4 * 16 * 64 + 128 * 64
    assert EnergyTransformer(cfg.model_copy(update={"hn_kind": "softmax"})).num_parameters() == et.num_parameters() + 1


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("dim", 0, "dim must be a positive integer"),
        ("heads", -1, "heads must be a positive integer"),
        ("steps", 0, "steps must be a positive integer"),
        ("alpha", 0.0, "alpha must be > 0"),
        ("memories", 0, "memories must be a positive integer"),
        ("hn_kind", "tanh", "'relu' or 'softmax'"),
        ("terms", "mlp", "'attn+hn', 'attn' or 'hn'"),
        ("grad_mode", "numeric", "'analytic' or 'autograd'"),
        ("unknown_field", 1, "unknown_field"),
    ],
)
def test_config_validation_names_field_and_allowed_values(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        ETConfig(**{field: value})
    assert needle in str(err.value)
    assert field in str(err.value)


def test_eval_mode_descent_needs_no_grad_and_returns_same_tokens_in_both_modes() -> None:
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    outs = []
    for mode in ("analytic", "autograd"):
        et = make(seed=5, grad_mode=mode).eval()
        with torch.no_grad():
            out, tr = et.descend(x)
        assert not out.requires_grad and tr is not None
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)
    assert math.isfinite(float(outs[0].sum()))
