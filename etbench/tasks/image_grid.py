"""Image grids as PNG files: the two small pieces of ``torchvision.utils`` (``make_grid``, ``save_image``) the
image task's artifacts need.

Written here because ``import torchvision`` loads its whole model zoo (~0.7 s of CPU), which every DeepSpeed rank-0
epilogue paid for one PNG; the layout and the 8-bit rounding follow torchvision's so the files are identical
(tested against torchvision).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def tile(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> Tensor:
    """(N, C, H, W) images → one (C', H', W') grid, ``nrow`` per row, ``padding`` pixels around each.

    One-channel images become three-channel (grey) ones, as in ``torchvision.utils.make_grid``.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"tile needs a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"tile needs nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def memory_grid(patches: Tensor, channels: int, patch: int, max_items: int = 64) -> Tensor:
    """Up to ``max_items`` decoded memories (M, C·p·p), each scaled to [0, 1] on its own, tiled in a square grid."""
    m = min(max_items, patches.shape[0])
    tiles = patches[:m].reshape(m, channels, patch, patch)
    lo = tiles.amin(dim=(1, 2, 3), keepdim=True)
    hi = tiles.amax(dim=(1, 2, 3), keepdim=True)
    return tile((tiles - lo) / (hi - lo).clamp_min(1e-8), nrow=math.ceil(math.sqrt(m)), padding=1, pad_value=1.0)


def save_png(image: Tensor, path: Path) -> Path:
    """Write a (C, H, W) image with values in [0, 1] (C = 1 or 3) as an 8-bit RGB PNG; returns ``path``."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"save_png needs a (1 or 3, H, W) image, got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    pixels = image.detach().float().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).cpu()
    Image.fromarray(pixels.numpy()).save(path)
    return Path(path)
