"""ET initialisation modes (SPEC §1.5): `spec` vs `width` standard deviations, tokens decoupled from attention."""

from __future__ import annotations

import math

import pytest
import torch

from etbench.config import resolve_run_config
from etbench.models.et_config import ETConfig
from etbench.models.registry import IMAGE_PRESETS, ImageModelSpec, build_image_model


def _build(name: str, dataset: str, seed: int = 0, **et: object):
    preset = IMAGE_PRESETS[dataset]
    torch.manual_seed(seed)
    spec = ImageModelSpec(name=name, image_shape=preset.image_shape, patch=preset.patch,
                          et=preset.et.model_copy(update=et))
    return build_image_model(spec)


def test_width_init_scales_attention_and_memories_to_the_papers_size() -> None:
    model = _build("et", "digits", init="width")  # D = 64, M = 256
    wk, wq, xi = model.et.attn.wk, model.et.attn.wq, model.et.hn.xi
    want_attn, want_mem = 0.002 * math.sqrt(768 / 64), 0.02 * math.sqrt(3072 / 256)
    for w in (wk, wq):
        assert w.std().item() == pytest.approx(want_attn, rel=0.05)  # 4 · 16 · 64 = 4096 draws
    assert xi.std().item() == pytest.approx(want_mem, rel=0.03)
    for tok in (model.cls_token, model.mask_token, model.pos_embed):  # tokens stay at token_init_std
        assert tok.std().item() == pytest.approx(0.002, rel=0.35 if tok.numel() == 64 else 0.05)


def test_spec_init_keeps_the_authors_numbers_and_tokens_are_their_own_setting() -> None:
    model = _build("et", "digits", attn_init_std=0.05, token_init_std=0.01)
    assert model.et.attn.wk.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.et.hn.xi.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.pos_embed.std().item() == pytest.approx(0.01, rel=0.05)  # not tied to attn_init_std any more
    vit = _build("vit", "digits", attn_init_std=0.05, token_init_std=0.01)
    assert vit.pos_embed.std().item() == pytest.approx(0.01, rel=0.05)


def test_width_equals_spec_on_the_paper_preset() -> None:
    cfg = IMAGE_PRESETS["imagenet"].et
    w = cfg.model_copy(update={"init": "width"})
    assert w.attn_std == cfg.attn_std == 0.002 and w.mem_std == cfg.mem_std == 0.02
    a = _build("et", "imagenet", seed=3)
    b = _build("et", "imagenet", seed=3, init="width")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_init_mode_is_validated_and_named_in_the_resolved_config() -> None:
    cfg = resolve_run_config({"task": {"dataset": "digits"}, "model": {"et": {"init": "width"}}})
    assert cfg.model.et.init == "width" and cfg.flat()["model.et.init"] == "width"
    with pytest.raises(ValueError, match="init"):
        ETConfig(init="wide")
    with pytest.raises(ValueError, match="token_init_std"):
        ETConfig(token_init_std=0.0)
