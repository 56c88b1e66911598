"""`etbench bench image`: training and inference throughput of the image models (ET and the ViT baselines).

Each model gets the same random normalised images of a dataset preset's shape and the same SPEC §2 mask
(``draw_mask``, ratio 0.5). A training step is forward + ``patch_losses(...).loss()`` + backward + AdamW; inference
is a ``no_grad`` forward in eval mode (the ViT blocks may take torch's fused fast path there). Models are timed in
alternating order so machine noise hits all alike; parameters and analytic forward FLOPs sit beside each timing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from etbench.bench.common import machine_info, peak_memory_mb, summary, timed, write_json
from etbench.models.registry import IMAGE_PRESETS, ImageModelSpec, build_image_model, describe, get, names
from etbench.tasks.image_completion import draw_mask, patch_losses

MASK_RATIO = 0.5


def image_spec(name: str, dataset_preset: str) -> ImageModelSpec:
    """The spec of model ``name`` at a dataset preset's geometry and ET sizes."""
    if dataset_preset not in IMAGE_PRESETS:
        raise ValueError(f"unknown dataset preset {dataset_preset!r}; allowed: {', '.join(IMAGE_PRESETS)}")
    p = IMAGE_PRESETS[dataset_preset]
    return ImageModelSpec(name=name, image_shape=p.image_shape, patch=p.patch, et=p.et)


def _setup(spec: ImageModelSpec, batch: int, device: str, seed: int) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = build_image_model(spec).to(device)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *spec.image_shape, generator=gen).to(device)
    mask = draw_mask(batch, model.num_patches, MASK_RATIO, gen, device)
    return model, images, mask


def make_train_step(spec: ImageModelSpec, batch: int, device: str, seed: int = 0) -> Callable[[], float]:
    """A closure running one training step (forward, masked-patch loss, backward, AdamW) of a fresh model."""
    model, images, mask = _setup(spec, batch, device, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.05)
    std = torch.ones(spec.image_shape[0], device=device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = patch_losses(model(images, mask.replaced), images, mask, spec.patch, std).loss()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def make_infer_step(spec: ImageModelSpec, batch: int, device: str, seed: int = 0) -> Callable[[], torch.Tensor]:
    """A closure running one ``no_grad`` eval-mode forward of a fresh model."""
    model, images, mask = _setup(spec, batch, device, seed)
    model.eval()

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(images, mask.replaced)

    return step


def _arch(model: torch.nn.Module) -> dict[str, Any]:
    arch = getattr(model, "arch", None)
    if arch is not None:
        return arch.model_dump()
    cfg = model.et.cfg  # type: ignore[union-attr]
    return {"dim": cfg.dim, "heads": cfg.heads, "head_dim": cfg.head_dim, "memories": cfg.num_memories,
            "steps": cfg.steps, "grad_mode": cfg.grad_mode}


def run_image_bench(
    out: Path,
    *,
    dataset_preset: str = "cifar10",
    batch: int = 32,
    repeats: int = 5,
    device: str = "cpu",
    models: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Time every model's training and inference step (``models``: default every registered image model but the
    ET-ladder rungs, which are asked for by name); write ``out/bench_image.json`` and return the report."""
    allowed = names("image")
    models = tuple(m for m in allowed if get("image", m).family != "ladder") if models is None else models
    bad = [m for m in models if m not in allowed]
    if bad or not models:
        raise ValueError(f"models must be a non-empty subset of {', '.join(allowed)}; got {list(models)}")
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be >= 1, got batch={batch}, repeats={repeats}")
    models = tuple(dict.fromkeys(models))
    specs = {m: image_spec(m, dataset_preset) for m in models}
    mem = {m: peak_memory_mb(make_train_step, (specs[m], batch, device), device) for m in models}
    train = {m: make_train_step(specs[m], batch, device) for m in models}
    infer = {m: make_infer_step(specs[m], batch, device) for m in models}
    for m in models:  # warm-up (allocator, kernels)
        train[m]()
        infer[m]()
    times: dict[str, dict[str, list[float]]] = {m: {"train": [], "infer": []} for m in models}
    for r in range(repeats):
        for m in models if r % 2 == 0 else models[::-1]:
            times[m]["train"].append(timed(train[m], device))
            times[m]["infer"].append(timed(infer[m], device))
    results: dict[str, Any] = {}
    for m in models:
        model = build_image_model(specs[m])
        cost = describe(model)
        entry: dict[str, Any] = {"arch": _arch(model), "params": int(cost["params"]),
                                 "flops_per_image": int(cost["flops_per_sample"]), "peak_train_mem_mb": mem[m]}
        for phase in ("train", "infer"):
            s = summary(times[m][phase])
            s["images_per_s"] = batch / s["median_s"]
            entry[phase] = s
        entry["infer"]["achieved_forward_gflops_per_s"] = cost["flops_per_sample"] * batch / entry["infer"][
            "median_s"] / 1e9
        results[m] = entry
    ref = "et" if "et" in models else models[0]
    preset = IMAGE_PRESETS[dataset_preset]
    report: dict[str, Any] = {
        "benchmark": "image",
        "what": "masked image completion; train = forward + masked-patch MSE + backward + AdamW; infer = no_grad "
                "eval forward; random normalised images, mask ratio 0.5 (90 % of chosen replaced)",
        "config": {"dataset_preset": dataset_preset, "image_shape": list(preset.image_shape), "patch": preset.patch,
                   "et": preset.et.model_dump(), "paper_comparable": preset.paper_comparable, "batch": batch,
                   "repeats": repeats, "models": list(models)},
        "machine": machine_info(device),
        "results": results,
        "relative_to": ref,
        "ratios": {
            m: {"train_throughput": results[m]["train"]["images_per_s"] / results[ref]["train"]["images_per_s"],
                "infer_throughput": results[m]["infer"]["images_per_s"] / results[ref]["infer"]["images_per_s"],
                "params": results[m]["params"] / results[ref]["params"],
                "flops_per_image": results[m]["flops_per_image"] / results[ref]["flops_per_image"]}
            for m in models
        },
    }
    write_json(report, out, "bench_image")
    return report
