"""The ViT family over width × depth (issue 25.2): ``vit-pm`` with ``model.pm_shape: width-depth`` finds a shape with
heads ≥ 8 wide within 5 % of the ET's parameters; the same search on FLOPs lands on ``vit`` (the ET's width, depth
T); the default (``width``) keeps every recorded run's shape and config hash."""

from __future__ import annotations

import pytest
import torch

from etbench.config import resolve_run_config
from etbench.engine.build import build_model
from etbench.models.baselines.vit import MaskedViT, match_shape, vit_arch, vit_flops, vit_param_count
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET
from etbench.models.registry import IMAGE_PRESETS, ImageModelSpec, build_image_model


@pytest.mark.parametrize("preset", ["digits", "mnist", "cifar10", "imagenet"])
def test_width_depth_match_has_wide_heads_and_matching_parameters(preset: str) -> None:
    p = IMAGE_PRESETS[preset]
    with torch.device("meta"):
        target = ImageET(p.image_shape, p.patch, p.et).num_parameters()
        model = build_image_model(ImageModelSpec(name="vit-pm", image_shape=p.image_shape, patch=p.patch, et=p.et,
                                                 pm_shape="width-depth"))
    assert isinstance(model, MaskedViT)
    a = model.arch
    assert a.dim // a.heads >= 8 and a.dim % a.heads == 0 and not a.tied and a.mlp_hidden == 4 * a.dim
    assert abs(model.num_parameters() - target) / target <= 0.05
    assert model.num_parameters() == vit_param_count(p.image_shape, p.patch, a)
    legacy = vit_arch(p.image_shape, p.patch, p.et, param_match=True)
    if preset == "digits":  # the degenerate legacy shape, and what replaces it
        assert (legacy.dim, legacy.heads) == (12, 4)
        assert (a.dim, a.heads, a.depth) == (16, 2, 8)


@pytest.mark.parametrize("preset", ["digits", "mnist", "cifar10"])
def test_the_flop_matched_shape_is_vit_itself(preset: str) -> None:
    p = IMAGE_PRESETS[preset]
    matched = match_shape(p.image_shape, p.patch, p.et, 4.0, "flops")
    assert matched == vit_arch(p.image_shape, p.patch, p.et)
    with torch.device("meta"):
        module = MaskedViT(p.image_shape, p.patch, matched)
    assert module.flops_per_image() == vit_flops(p.image_shape, p.patch, matched)


def test_a_too_small_et_falls_back_to_the_width_search() -> None:
    et = ETConfig(dim=8, heads=2, head_dim=4, memories=12, steps=2)  # 461 parameters: below any 8-wide-head ViT
    with pytest.raises(ValueError, match=r"vit-params: no width \(multiple of 8\)"):
        match_shape((1, 8, 8), 2, et, 4.0, "params")
    spec = ImageModelSpec(name="vit-pm", image_shape=(1, 8, 8), patch=2, et=et, pm_shape="width-depth")
    assert build_image_model(spec).arch == vit_arch((1, 8, 8), 2, et, param_match=True)  # type: ignore[union-attr]


def test_the_default_keeps_hashes_and_the_option_reaches_the_builder() -> None:
    base = {"task": {"dataset": "digits"}, "model": {"name": "vit-pm"}}
    legacy = resolve_run_config(base)
    explicit = resolve_run_config({**base, "model": {"name": "vit-pm", "pm_shape": "width"}})
    wide = resolve_run_config({**base, "model": {"name": "vit-pm", "pm_shape": "width-depth"}})
    assert "pm_shape" not in legacy.model_dump()["model"] and legacy.hash() == explicit.hash() != wide.hash()
    shapes = {c.model.pm_shape: build_model(c, {"image_shape": (1, 8, 8)}).arch for c in (legacy, wide)}
    assert (shapes["width"].dim, shapes["width-depth"].dim, shapes["width-depth"].depth) == (12, 16, 8)
