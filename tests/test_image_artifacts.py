"""Reconstruction figures compare models on the same images: the first test images under the fixed test masks,
whatever the model, training seed or configuration (issue 27.8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from etbench.config import resolve_run_config
from etbench.engine.build import build_model, build_task

TINY = {"task": {"dataset": "digits", "limit_train": 64, "limit_eval": 32}, "train": {"batch_size": 16}}


def _render(model: str, seed: int, out: Path) -> np.ndarray:
    cfg = resolve_run_config({**TINY, "model": {"name": model}, "train": {**TINY["train"], "seed": seed}})
    task = build_task(cfg, torch.device("cpu"))
    net = build_model(cfg, task.describe()).eval()
    out.mkdir()
    (path, *_) = task.write_artifacts(net, out, n=8)
    return np.asarray(Image.open(path).convert("L"))


def test_every_model_and_seed_is_drawn_on_the_same_test_images(tmp_path: Path) -> None:
    pngs = {(m, s): _render(m, s, tmp_path / f"{m}-{s}") for m, s in (("et", 0), ("vit", 0), ("et", 1))}
    ref = pngs[("et", 0)]
    third = ref.shape[0] // 3
    for key, img in pngs.items():
        assert img.shape == ref.shape, key
        assert np.array_equal(img[:third], ref[:third]), f"{key}: another masked input row"  # masked inputs
        assert np.array_equal(img[-third:], ref[-third:]), f"{key}: other original images"  # originals
    assert not np.array_equal(pngs[("vit", 0)][third:-third], ref[third:-third])  # the reconstructions differ
