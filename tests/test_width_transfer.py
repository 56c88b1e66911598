"""Coordinate check for μP (Yang et al. 2022, "Tensor Programs V", §5 / Fig. 5): after a few Adam steps, the
change of each block's activations from init has the same scale at every width under ``model.param: mup``, and
grows with the width under the standard parametrisation. Widths 16–128, 5 full-batch Adam steps on 8 random
images, for the ViT (per block) and the ET (after the descent); the numbers are the log-log slope of the RMS change
against the width (0 = flat; 1 = grows like the width). Also: the lr multipliers reach the optimiser, and the config
keeps every earlier run's hash."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from etbench.config import resolve_run_config
from etbench.engine.backend import make_optimizer, make_scheduler, optimizer_groups
from etbench.engine.build import build_model
from etbench.engine.ds_backend import param_groups as ds_param_groups
from etbench.errors import EtbenchError
from etbench.models.baselines.vit import MaskedViT, ViTArch
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET, MaskedPatchModel
from etbench.models.width_param import apply_mup

WIDTHS = (16, 32, 64, 128)
BASE_WIDTH = 16
LR, STEPS = 1e-2, 5


def _model(kind: str, width: int) -> MaskedPatchModel:
    if kind == "vit":
        return MaskedViT((1, 8, 8), 2, ViTArch(dim=width, heads=2, mlp_hidden=4 * width, depth=2))
    return ImageET((1, 8, 8), 2, ETConfig(dim=width, heads=2, head_dim=8, memories=4 * width, steps=2, init="width"))


def _activations(m: MaskedPatchModel, x: Tensor, replace: Tensor) -> dict[str, Tensor]:
    h = m.tokens(x, replace)
    out: dict[str, Tensor] = {}
    if isinstance(m, MaskedViT):
        for i, block in enumerate(m.blocks):
            h = block(h)
            out[f"block{i}"] = h
    else:
        assert isinstance(m, ImageET)
        out["descent"], _ = m.et.descend(h)
    return out


def _activation_change(kind: str, width: int, mup: bool) -> dict[str, float]:
    """RMS of (activation after STEPS Adam steps − activation at init), per block, on a fixed batch."""
    torch.manual_seed(0)
    m = _model(kind, width)
    if mup:
        apply_mup(m, BASE_WIDTH)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    replace = torch.rand(8, 16, generator=g) < 0.5
    target = torch.randn(8, 16, 4, generator=g)
    with torch.no_grad():
        before = _activations(m, x, replace)
    opt = torch.optim.Adam(optimizer_groups(m, LR, 0.0))
    for _ in range(STEPS):
        loss = (m(x, replace) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = _activations(m, x, replace)
    return {k: float((after[k] - before[k]).pow(2).mean().sqrt()) for k in before}


def _slope(values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    xs = [math.log(w) for w in WIDTHS]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster and leaves the other core alone
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["vit", "et"])
def test_coordinate_check_flat_under_mup_and_growing_under_standard(kind: str) -> None:
    rows = {mup: [_activation_change(kind, w, mup) for w in WIDTHS] for mup in (False, True)}
    for layer in rows[True][0]:
        sp = [r[layer] for r in rows[False]]
        mu = [r[layer] for r in rows[True]]
        report = f"{kind} {layer}: standard {[f'{v:.3g}' for v in sp]}, mup {[f'{v:.3g}' for v in mu]}"
        # measured (torch 2.14, CPU): mup slopes −0.11, −0.19 (ViT blocks), 0.04 (ET); standard 1.09, 0.81, 1.02
        assert abs(_slope(mu)) < 0.3, report
        assert max(mu) / min(mu) < 1.8, report
        assert _slope(sp) > 0.6, report
        assert sp[-1] / sp[0] > 3.0, report


def test_mup_lr_multipliers_reach_the_optimiser() -> None:
    cfg = resolve_run_config({"task": {"dataset": "digits"},
                              "model": {"name": "vit", "param": "mup", "base_width": 16}})
    model = build_model(cfg, {"image_shape": (1, 8, 8)})  # the digits preset's width 64: r = 16 / 64
    opt = make_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert opt.param_groups[0]["lr"] == cfg.train.lr  # the logged lr is the base one
    assert lr_of[id(named["decoder.weight"])] == pytest.approx(cfg.train.lr / 4)
    assert lr_of[id(named["blocks.0.linear1.weight"])] == pytest.approx(cfg.train.lr / 4)
    assert lr_of[id(named["blocks.0.self_attn.in_proj_weight"])] == pytest.approx(cfg.train.lr / 4)
    for name in ("encoder.weight", "pos_embed", "cls_token", "decoder.bias", "blocks.0.norm1.weight"):
        assert lr_of[id(named[name])] == cfg.train.lr, name
    assert float(named["blocks.0.self_attn.in_proj_weight"][:64].detach().abs().max()) == 0.0  # zero query init
    sched = make_scheduler(opt, cfg.train, steps_per_epoch=10)  # warm-up/cosine scales every group alike
    for _ in range(15):
        opt.step()
        sched.step()
    scaled = {g["lr"] / opt.param_groups[0]["lr"] for g in opt.param_groups}
    assert sorted(round(v, 12) for v in scaled) == [0.25, 1.0] and 0 < opt.param_groups[0]["lr"] < cfg.train.lr
    ds = {id(p): g["lr"] for g in ds_param_groups(model, cfg.train.lr, cfg.train.weight_decay) for p in g["params"]}
    assert ds == {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # the DeepSpeed groups
    standard = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"param": "standard"})}),
                           {"image_shape": (1, 8, 8)})
    ratio = named["decoder.weight"].detach().std() / standard.state_dict()["decoder.weight"].std()
    assert float(ratio) == pytest.approx(0.5, rel=1e-5)  # readout init std × sqrt(16 / 64)


def test_standard_param_keeps_hashes_and_mup_is_validated() -> None:
    plain = resolve_run_config({"task": {"dataset": "digits"}, "model": {"name": "vit"}})
    explicit = resolve_run_config({"task": {"dataset": "digits"},
                                   "model": {"name": "vit", "param": "standard", "base_width": 32}})
    assert "param" not in plain.model_dump()["model"] and plain.hash() == explicit.hash()
    mup = resolve_run_config({"task": {"dataset": "digits"}, "model": {"name": "vit", "param": "mup"}})
    assert mup.hash() != plain.hash() and mup.flat()["model.param"] == "mup"
    for name in ("et", "ladder-1"):
        with pytest.raises(EtbenchError, match=rf"model.name '{name}' needs model\.et\.init 'width'"):
            resolve_run_config({"task": {"dataset": "digits"}, "model": {"name": name, "param": "mup"}})
    with pytest.raises(EtbenchError, match=r"image models only"):
        resolve_run_config({"task": {"kind": "graph"}, "model": {"name": "et", "param": "mup"}})
