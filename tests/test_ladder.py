"""The energy-constraint ladder (etbench.models.ladder): rung 0 is the image ET, each rung differs from the one before
in exactly its one change (shown by undoing it on copied weights, by parameter and FLOP counts), and the last rungs
differ from the ViTs only by the listed differences (counted in parameters, equal in FLOPs)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from etbench.config import resolve_run_config
from etbench.engine.run import run_single
from etbench.models import registry
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET
from etbench.models.ladder import RUNGS, LadderModel, build_rung

SHAPE, PATCH = (1, 8, 8), 2
N = 17  # tokens: 16 patches + CLS
D, H, Y, M, T = 8, 2, 4, 32, 3
BASE = {"dim": D, "heads": H, "head_dim": Y, "memories": M, "steps": T, "attn_init_std": 0.3, "mem_init_std": 0.3}
NAMES = [r.name for r in RUNGS]


def et_config(**kw: object) -> ETConfig:
    return ETConfig(**{**BASE, **kw})


def rung(name: str, seed: int = 0, **kw: object) -> LadderModel:
    torch.manual_seed(seed)
    return build_rung(SHAPE, PATCH, et_config(**kw), rung=name).double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, *SHAPE, generator=g, dtype=torch.float64), torch.rand(3, 16, generator=g) < 0.5


def tokens(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kw", [{}, {"self_attention": False}, {"hn_kind": "softmax", "hn_beta_init": 0.5},
                                {"terms": "attn"}, {"terms": "hn"}])
def test_rung_zero_is_the_image_et(kw: dict) -> None:
    torch.manual_seed(0)
    et = ImageET(SHAPE, PATCH, et_config(**kw)).double()
    ladder = rung("et", **kw)
    images, replace = batch()
    for grad in (True, False):  # the ET's memory-lean training path and its closed forms
        with torch.set_grad_enabled(grad):
            want, got = et(images, replace), ladder(images, replace)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    moved = ladder.process(x := ladder.tokens(images, replace)) - ladder.blocks[0].norm(x)
    assert moved.abs().max() > 0.05  # the descent does something, so the equality is not trivial


def test_rung_zero_update_is_minus_the_energy_gradient_and_rung_one_is_no_gradient() -> None:
    torch.manual_seed(0)
    et = ImageET(SHAPE, PATCH, et_config()).double()
    block0, block1 = rung("et").blocks[0], rung("ladder-1").blocks[0]
    g = tokens().requires_grad_(True)
    (want,) = torch.autograd.grad(et.et.energy(g).E.sum(), g)
    torch.testing.assert_close(block0.update(g), -want, rtol=1e-12, atol=1e-12)
    # a gradient field has a symmetric Jacobian (the Hessian); the value path breaks the symmetry
    g1 = tokens()[:1, :3]
    for block, symmetric in ((block0, True), (block1, False)):
        jac = torch.autograd.functional.jacobian(lambda t, b=block: b.update(t).flatten(), g1).reshape(3 * D, 3 * D)
        asym = (jac - jac.T).abs().max() / jac.abs().max()
        assert (asym < 1e-10) if symmetric else (asym > 1e-2), (block.rung.name, float(asym))


def _undo(before: LadderModel, after: LadderModel) -> None:
    """Give ``after`` (one rung up, same seed: the shared weights are drawn identically) weights under which its one
    change is inert; rung 4's change (the second term) has no weights and is checked term by term below."""
    b, a = before.blocks[0], after.blocks[0]
    name = after.rung.name
    if name == "ladder-1":  # values = keys, read out through W^Q: the ET's value path
        a.wv.copy_(a.wk)
        a.wo.copy_(a.wq)
    elif name == "ladder-2":  # ξ both ways
        a.xi_down.copy_(a.xi)
    elif name == "ladder-3":  # a per-feature gain that happens to be one scalar
        b.norm.gamma.fill_(1.7)
        b.norm.delta.normal_()
        a.norm.weight.fill_(1.7)
        a.norm.bias.copy_(b.norm.delta)
    elif name == "ladder-5":  # every step gets the tied block's weights, the output LN the step LN's
        for block in after.blocks:
            block.load_state_dict(b.state_dict())
        after.out_norm.load_state_dict(b.norm.state_dict())


@pytest.mark.parametrize(("before", "after"), [p for p in itertools.pairwise(NAMES) if p[1] != "ladder-4"])
def test_each_rung_undone_on_copied_weights_is_the_rung_before(before: str, after: str) -> None:
    images, replace = batch()
    lower, upper = rung(before), rung(after)
    with torch.no_grad():
        fresh = upper(images, replace)
        _undo(lower, upper)
        want, got = lower(images, replace), upper(images, replace)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (fresh - want).abs().max() > 1e-6  # with its own weights the rung does differ


def test_rung_four_drops_exactly_the_second_attention_term() -> None:
    b3, b4 = rung("ladder-3").blocks[0], rung("ladder-4").blocks[0]  # same seed, same weights
    g = tokens()
    q = torch.stack([g @ b3.wq[h].T for h in range(H)], -3)  # (B, H, N, Y), head by head
    k = torch.stack([g @ b3.wk[h].T for h in range(H)], -3)
    w = torch.softmax(q @ k.transpose(-1, -2) / Y**0.5, -1)
    second = sum((w[:, h].transpose(-1, -2) @ q[:, h]) @ b3.wk[h] for h in range(H))
    torch.testing.assert_close(b3.update(g) - b4.update(g), second, rtol=1e-10, atol=1e-12)


def test_parameter_and_flop_differences_are_the_closed_form_ones() -> None:
    def params(name: str, steps: int = T) -> int:
        return rung(name, steps=steps).num_parameters()

    def flops(name: str) -> int:
        return rung(name).flops_per_image()

    hyd = H * Y * D
    assert params("ladder-1") - params("et") == 2 * hyd  # W^V, W^O
    assert params("ladder-2") - params("ladder-1") == M * D  # ξ_down
    assert params("ladder-3") - params("ladder-2") == D - 1  # γ: scalar → per feature
    assert params("ladder-4") == params("ladder-3")
    block4 = 2 * D + 4 * hyd + 2 * M * D
    assert params("ladder-5") - params("ladder-4") == (T - 1) * block4 + 2 * D  # T blocks and an output LN
    for name in NAMES[:-1]:  # tied: the count does not depend on T
        assert params(name, steps=1) == params(name, steps=7)
    assert params("ladder-5", steps=7) - params("ladder-5", steps=1) == 6 * block4
    assert flops("ladder-1") - flops("et") == T * 2 * N * hyd  # the V projection
    assert flops("ladder-2") == flops("ladder-1") == flops("ladder-3")
    assert flops("ladder-3") - flops("ladder-4") == T * (2 * H * N * N * Y + 2 * N * hyd)  # ωᵀ·Q and its read-out
    assert flops("ladder-5") == flops("ladder-4")


def test_the_last_rungs_differ_from_the_vits_by_the_listed_parameters_only() -> None:
    """With H·Y = D and M = 4D: equal FLOPs; vit-tied − ladder-4 = the ViT's biases (QKV 3D, read-out D, MLP M + D),
    its second LN (2D) and its separate final LN (2D); vit − ladder-5 = T × (biases + second LN)."""
    cfg = et_config(memories=4 * D)
    assert H * Y == D
    count = {m: registry.num_parameters("image", m, image_shape=SHAPE, patch=PATCH, **registry.options(
        "image", m, registry.ImageModelSpec(name=m, image_shape=SHAPE, patch=PATCH, et=cfg))) for m in
        ("ladder-4", "ladder-5", "vit", "vit-tied")}
    cost = {m: registry.flops("image", m, image_shape=SHAPE, patch=PATCH, et=cfg, **(
        {"mlp_ratio": 4.0} if m.startswith("vit") else {})) for m in count}
    biases, second_ln = 3 * D + D + 4 * D + D, 2 * D
    assert count["vit-tied"] - count["ladder-4"] == biases + second_ln + 2 * D
    assert count["vit"] - count["ladder-5"] == T * (biases + second_ln)
    assert cost["ladder-4"] == cost["vit-tied"] and cost["ladder-5"] == cost["vit"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_is_finite_and_reaches_every_parameter(name: str) -> None:
    model = rung(name).float()
    images, replace = (t.float() if t.is_floating_point() else t for t in batch())
    out = model(images, replace)
    assert out.shape == (3, 16, 4) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_unknown_rung_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown ladder rung 'ladder-9'; allowed: et, ladder-1, .*, ladder-5$"):
        build_rung(SHAPE, PATCH, et_config(), rung="ladder-9")


def test_a_rung_trains_through_the_engine_from_its_registered_name(tmp_path: Path) -> None:
    cfg = resolve_run_config({
        "task": {"dataset": "digits", "limit_train": 128, "limit_eval": 32},
        "model": {"name": "ladder-5", "et": {"steps": 2}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0, "eval_trace_samples": 4},
    })
    res = run_single(cfg, tmp_path / "run", progress=False)
    losses = [row["train/loss"] for row in res.state.history]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "metrics.json").exists()
