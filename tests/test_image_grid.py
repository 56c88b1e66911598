"""etbench.tasks.image_grid reproduces torchvision's make_grid / save_image (the oracle) pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from etbench.tasks.image_grid import save_png, tile

torchvision_utils = pytest.importorskip("torchvision.utils")


@pytest.mark.parametrize(("n", "c", "nrow", "padding", "pad_value"),
                         [(5, 1, 3, 1, 1.0), (4, 3, 8, 2, 0.0), (1, 1, 8, 0, 0.5), (7, 3, 2, 3, 0.25)])
def test_tile_equals_make_grid(n: int, c: int, nrow: int, padding: int, pad_value: float) -> None:
    g = torch.Generator().manual_seed(n * 10 + c)
    images = torch.rand(n, c, 6, 5, generator=g)
    ours = tile(images, nrow=nrow, padding=padding, pad_value=pad_value)
    ref = torchvision_utils.make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_save_png_equals_save_image(tmp_path: Path, c: int) -> None:
    img = torch.rand(c, 9, 13, generator=torch.Generator().manual_seed(c))
    img[:, 0, 0] = 1.2  # out of range: clamped the same way
    img[:, 0, 1] = -0.1
    ours, ref = tmp_path / "ours.png", tmp_path / "ref.png"
    assert save_png(img, ours) == ours
    torchvision_utils.save_image(img, ref)
    a, b = np.asarray(Image.open(ours)), np.asarray(Image.open(ref))
    assert a.shape == b.shape == (9, 13, 3)
    np.testing.assert_array_equal(a, b)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        tile(torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match="nrow"):
        tile(torch.zeros(2, 1, 4, 4), nrow=0)
    with pytest.raises(ValueError, match=r"\(1 or 3, H, W\)"):
        save_png(torch.zeros(2, 4, 4), Path("unused.png"))


def test_memory_grid_scales_each_memory_and_tiles_them_square() -> None:
    from etbench.tasks.image_grid import memory_grid

    patches = torch.stack([torch.arange(16.0) * (k + 1) - 3 * k for k in range(5)])  # 5 memories, 1 × 4 × 4
    grid = memory_grid(patches, channels=1, patch=4)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)  # ceil(sqrt(5)) = 3 columns, 2 rows, 4 × 4 tiles, padding 1
    first = grid[0, 1:5, 1:5]
    torch.testing.assert_close(first, torch.arange(16.0).reshape(4, 4) / 15)  # each tile scaled to [0, 1] alone
    torch.testing.assert_close(grid[0, 6:10, 1:5], first)  # memory 3 (row 1, col 0): same shape, same scaling
    assert grid[:, 0].eq(1.0).all() and grid[:, 6:10, 11:15].eq(1.0).all()  # padding and the empty sixth slot
    assert memory_grid(patches, channels=1, patch=4, max_items=2).shape == (3, 6, 11)
