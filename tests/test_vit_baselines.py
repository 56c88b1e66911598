"""Standard-transformer baselines (SPEC §2): shapes and gradients, weight tying, parameter matching, FLOP counts."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from etbench.bench import image as image_bench
from etbench.models.baselines.vit import MaskedViT, ViTArch, et_param_count, match_parameters
from etbench.models.image import ImageET
from etbench.models.registry import IMAGE_PRESETS, ImageModelSpec, build_image_model
from etbench.tasks.image_completion import draw_mask, patch_losses


def spec(name: str, preset: str = "digits", **et: object) -> ImageModelSpec:
    p = IMAGE_PRESETS[preset]
    return ImageModelSpec(name=name, image_shape=p.image_shape, patch=p.patch, et=p.et.model_copy(update=et))


def batch(s: ImageModelSpec, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(b, *s.image_shape, generator=gen)
    n = (s.image_shape[1] // s.patch) * (s.image_shape[2] // s.patch)
    return images, draw_mask(b, n, 0.5, gen).replaced


@pytest.mark.parametrize("name", ["vit", "vit-tied", "vit-pm"])
def test_forward_backward_on_digits(name: str) -> None:
    torch.manual_seed(0)
    s = spec(name)
    model = build_image_model(s)
    assert isinstance(model, MaskedViT)
    images, _ = batch(s, 4)
    mask = draw_mask(4, model.num_patches, 0.5, torch.Generator().manual_seed(1))
    pred = model(images, mask.replaced)
    assert pred.shape == (4, 16, 4)
    loss = patch_losses(pred, images, mask, s.patch, torch.ones(1)).loss()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.self_attn.in_proj_weight"].abs().sum() > 0 and grads["mask_token"].abs().sum() > 0
    model.eval()  # eval + no_grad may take torch's fused fast path: same numbers
    with torch.no_grad():
        torch.testing.assert_close(model(images, mask.replaced), pred.detach(), atol=1e-5, rtol=1e-4)
    # tokens are initialised like the ET's: N(0, 0.002²)
    assert model.pos_embed.std().item() == pytest.approx(0.002, rel=0.3)


def test_vit_widths_and_depths() -> None:
    vit = build_image_model(spec("vit"))
    assert isinstance(vit, MaskedViT)
    assert (vit.arch.dim, vit.arch.heads, vit.arch.depth, vit.arch.mlp_hidden, len(vit.blocks)) == (64, 4, 12, 256, 12)
    layer = vit.blocks[0]
    assert layer.norm_first and layer.self_attn.batch_first and layer.self_attn.num_heads == 4
    assert isinstance(vit.norm, torch.nn.LayerNorm)
    assert len(build_image_model(spec("vit", steps=3)).blocks) == 3


def test_tied_shares_one_block() -> None:
    torch.manual_seed(0)
    tied = build_image_model(spec("vit-tied"))
    assert isinstance(tied, MaskedViT) and len(tied.blocks) == 1 and tied.arch.depth == 12
    one_block = build_image_model(spec("vit", steps=1))
    assert tied.num_parameters() == one_block.num_parameters()
    d, f = 64, 256
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d  # qkv+out (with biases), MLP, two LayerNorms
    assert tied.num_parameters() - block == build_image_model(spec("vit", steps=2)).num_parameters() - 2 * block
    # same weights, more applications → a different output
    tied3 = build_image_model(spec("vit-tied", steps=3))
    tied3.load_state_dict(tied.state_dict())
    images, replace = batch(spec("vit-tied"))
    with torch.no_grad():
        out12, out3 = tied(images, replace), tied3(images, replace)
        # 3 applications of the block by hand
        x = tied.tokens(images, replace)
        for _ in range(3):
            x = tied.blocks[0](x)
        by_hand = tied.decoder(tied.norm(x)[:, 1:])
    torch.testing.assert_close(out3, by_hand)
    assert (out12 - out3).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["digits", "mnist", "cifar10", "imagenet"])
def test_param_matched_within_5_percent(preset: str) -> None:
    s = spec("vit-pm", preset)
    target = et_param_count(s.image_shape, s.patch, s.et)
    if preset == "digits":  # the meta-device count is the real ET's count
        assert target == ImageET(s.image_shape, s.patch, s.et).num_parameters()
    arch = match_parameters(s.image_shape, s.patch, s.et, s.mlp_ratio, target)
    assert arch.depth == 12 and not arch.tied and arch.dim % arch.heads == 0
    if preset == "imagenet":  # large enough to keep every head and the default MLP ratio
        assert arch.heads == 12 and arch.mlp_hidden == 4 * arch.dim
        return
    model = build_image_model(s)
    assert abs(model.num_parameters() - target) / target <= 0.05
    assert len(model.blocks) == 12


def test_param_match_impossible_raises() -> None:
    with pytest.raises(ValueError, match=r"vit-pm: no width.*within 5%"):
        s = spec("vit-pm")
        match_parameters(s.image_shape, s.patch, s.et, s.mlp_ratio, target=10)


def _counted_forward_flops(model: torch.nn.Module, images: torch.Tensor, replace: torch.Tensor) -> int:
    """Forward FLOPs seen by torch: train mode + grad on (no fused fast path), math SDPA (so scores and
    attention·V appear as bmm; the CPU flash kernel is not in FlopCounterMode's table)."""
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, replace)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("name", ["vit", "vit-tied", "vit-pm"])
def test_flops_match_flop_counter(name: str) -> None:
    s = spec(name, steps=3)
    model = build_image_model(s)
    images, replace = batch(s, 2)
    counted = _counted_forward_flops(model, images, replace)
    analytic = 2 * model.flops_per_image()
    assert abs(counted - analytic) / analytic <= 0.10
    assert counted == analytic  # every counted matmul is in the closed form, and nothing else is


def test_flops_cifar_geometry_and_wider_mlp() -> None:
    arch = ViTArch(dim=32, heads=4, mlp_hidden=80, depth=2)
    model = MaskedViT((3, 32, 32), 4, arch)
    images, replace = torch.randn(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.bool)
    assert _counted_forward_flops(model, images, replace) == model.flops_per_image()
    n, d, f = 65, 32, 80
    assert model.flops_per_image() == 2 * (8 * n * d * d + 4 * n * n * d + 4 * n * d * f) + 4 * 64 * 48 * 32


def test_bad_specs_raise() -> None:
    with pytest.raises(ValueError, match="not divisible by heads"):
        build_image_model(spec("vit", dim=30))
    with pytest.raises(ValueError, match=r"unknown image model 'gcn'; allowed: et, ladder-1, .*, vit-pm"):
        spec("gcn")


def test_image_bench_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark at toy size; peak memory's spawned child is replaced by an in-process call that checks the
    step factory is what a spawned child needs (module-level, picklable arguments)."""
    calls: list[str] = []

    def fake_peak(make_step, args, device):  # type: ignore[no-untyped-def]
        pickle.dumps((make_step, args))
        assert make_step.__module__ == "etbench.bench.image" and device == "cpu"
        loss = make_step(*args)()
        assert math.isfinite(loss)
        calls.append(args[0].name)
        return 1.5

    monkeypatch.setattr(image_bench, "peak_memory_mb", fake_peak)
    report = image_bench.run_image_bench(tmp_path, dataset_preset="digits", batch=2, repeats=1)
    on_disk = json.loads((tmp_path / "bench_image.json").read_text())
    assert on_disk["benchmark"] == "image" and on_disk["config"]["dataset_preset"] == "digits"
    assert calls == ["et", "vit", "vit-tied", "vit-pm"] and on_disk["relative_to"] == "et"
    for name in calls:
        r = on_disk["results"][name]
        assert set(r) >= {"arch", "params", "flops_per_image", "peak_train_mem_mb", "train", "infer"}
        assert r["params"] == build_image_model(spec(name)).num_parameters()
        for phase in ("train", "infer"):
            assert len(r[phase]["times_s"]) == 1
            assert r[phase]["images_per_s"] == pytest.approx(2 / r[phase]["median_s"])
    assert on_disk["ratios"]["et"]["train_throughput"] == 1.0
    assert on_disk["results"]["vit-tied"]["flops_per_image"] == on_disk["results"]["vit"]["flops_per_image"]
    assert report["results"]["vit-pm"]["params"] == on_disk["results"]["vit-pm"]["params"]
    with pytest.raises(ValueError, match="unknown dataset preset"):
        image_bench.run_image_bench(tmp_path, dataset_preset="svhn", models=("et",))
    with pytest.raises(ValueError, match="subset of"):
        image_bench.run_image_bench(tmp_path, models=("resnet",))
