"""The ET's FLOPs counted exactly (``torch.utils.flop_counter``), and the no-grad analytic inference branch equal
to autograd (float64) — for the ReLU and softmax Hopfield nets, self_attention on/off, and with masks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from etbench.models.energy import EnergyTransformer
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET

VARIANTS = [{}, {"terms": "attn"}, {"terms": "hn"}, {"hn_kind": "softmax"}, {"self_attention": False}]


def et_step_flops(cfg: ETConfig, n: int, pairs: int) -> int:
    """Matmul FLOPs of one descent step on n tokens, by hand: attention 8nDHY (fused Q/K projection and read-out)
    plus 6HY per attended (query, key) pair (scores, ω·K, ωᵀ·Q) — n² pairs when dense, E' edges on a graph;
    Hopfield 4nMD (ξ·g and ξᵀ·a). Also used by tests/test_model_registry.py."""
    d, h, y, m = cfg.dim, cfg.heads, cfg.head_dim, cfg.num_memories
    attn = 8 * n * d * h * y + 6 * h * pairs * y if cfg.use_attn else 0
    hn = 4 * n * m * d if cfg.use_hn else 0
    return attn + hn


@pytest.mark.parametrize("kw", VARIANTS)
def test_image_et_inference_flops_exact(kw: dict) -> None:
    cfg = ETConfig(dim=32, heads=2, head_dim=8, memories=48, steps=3, **kw)
    model = ImageET((1, 8, 8), 2, cfg).eval()
    images, replace = torch.randn(2, 1, 8, 8), torch.zeros(2, 16, dtype=torch.bool)
    replace[:, :7] = True
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, replace)
    assert counter.get_total_flops() == 2 * model.flops_per_image()  # two images
    n = model.num_tokens
    assert model.et.flops(n) == 3 * et_step_flops(cfg, n, n * n)  # the closed form, by hand


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("masked", [False, True])
def test_no_grad_analytic_branch_equals_autograd(kw: dict, masked: bool) -> None:
    torch.manual_seed(0)
    base = ETConfig(dim=16, heads=2, head_dim=8, memories=24, steps=4, attn_init_std=0.3, **kw)
    analytic = EnergyTransformer(base.model_copy(update={"grad_mode": "analytic"})).double()
    auto = EnergyTransformer(base.model_copy(update={"grad_mode": "autograd"})).double()
    auto.load_state_dict(analytic.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = None
    if masked:  # key-padding style mask: the last two tokens of sample 1 are padding
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[1, -2:] = False
    with torch.no_grad():
        got = analytic(x, mask=mask)
    want = auto(x, mask=mask)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    g = analytic.norm(x)
    grad_a, en_a = analytic.energy_grad(g, mask, mode="analytic")
    grad_b, en_b = analytic.energy_grad(g, mask, mode="autograd")
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(en_a.E, en_b.E, rtol=1e-12, atol=1e-12)
