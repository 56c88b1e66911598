"""Masked image completion (SPEC §2): which patches are chosen/replaced, the loss, and the metrics.

Per image, ``mask_ratio`` of the N patches are *chosen* uniformly at random; of the chosen, 90 % are *replaced* by the
MASK token and 10 % keep their true embedding (BERT/ET style). The loss is the MSE over all chosen patches in the
normalised pixel space; we also report the MSE over the replaced patches only and the PSNR of the replaced patches
in [0, 1] pixel space. Masks are drawn from an explicit ``torch.Generator`` so a seed fixes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from etbench.models.image import patchify

REPLACE_FRACTION = 0.9


@dataclass
class PatchMask:
    """chosen: patches in the loss; replaced: the subset fed as MASK tokens. Both (B, N) bool."""

    chosen: Tensor
    replaced: Tensor


def draw_mask(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator,
              device: torch.device | str = "cpu") -> PatchMask:
    """Choose round(mask_ratio·N) patches per image; replace round(0.9·chosen) of them by MASK."""
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    n_chosen = max(1, round(mask_ratio * num_patches))
    n_replaced = max(1, round(REPLACE_FRACTION * n_chosen))
    order = torch.rand(batch, num_patches, generator=generator).argsort(1)
    rank = order.argsort(1)  # rank of each patch in the random order
    chosen = rank < n_chosen
    replaced = rank < n_replaced
    return PatchMask(chosen.to(device), replaced.to(device))


@dataclass
class BatchLosses:
    """Sums (not means) over a batch, so they aggregate exactly across batches and workers."""

    se_chosen: Tensor  # sum of squared errors over chosen patch pixels (normalised space)
    n_chosen: Tensor  # number of chosen pixels
    se_replaced: Tensor
    n_replaced: Tensor
    se_replaced_01: Tensor  # squared error over replaced pixels in [0, 1] space (for PSNR)

    def loss(self) -> Tensor:
        return self.se_chosen / self.n_chosen.clamp_min(1)

    def as_tensor(self) -> Tensor:
        return torch.stack([self.se_chosen, self.n_chosen, self.se_replaced, self.n_replaced, self.se_replaced_01])


def patch_losses(pred: Tensor, images: Tensor, mask: PatchMask, patch: int, std: Tensor) -> BatchLosses:
    """Squared errors of predicted patches (B, N, P) against the true images (B, C, H, W), normalised space.

    ``std`` (C,) converts normalised errors to [0, 1] pixel errors for PSNR (the mean cancels in a difference).
    """
    target = patchify(images, patch)
    err = (pred.float() - target.float()).pow(2)  # (B, N, P)
    c = images.shape[1]
    scale = std.to(err.device, err.dtype).repeat_interleave(err.shape[-1] // c).pow(2)  # channel-major patches
    per_patch = err.sum(-1)
    per_patch_01 = (err * scale).sum(-1)
    p = err.shape[-1]
    ch, rp = mask.chosen.to(err.dtype), mask.replaced.to(err.dtype)
    return BatchLosses(
        se_chosen=(per_patch * ch).sum(),
        n_chosen=ch.sum() * p,
        se_replaced=(per_patch * rp).sum().detach(),
        n_replaced=rp.sum() * p,
        se_replaced_01=(per_patch_01 * rp).sum().detach(),
    )


def summarise(totals: Tensor) -> dict[str, float]:
    """Metrics from summed :meth:`BatchLosses.as_tensor` rows: mse_chosen (= loss), mse_masked, psnr."""
    se_c, n_c, se_r, n_r, se_r01 = (float(v) for v in totals)
    mse_01 = se_r01 / max(n_r, 1.0)
    return {
        "loss": se_c / max(n_c, 1.0),
        "mse_chosen": se_c / max(n_c, 1.0),
        "mse_masked": se_r / max(n_r, 1.0),
        "psnr": 10.0 * math.log10(1.0 / mse_01) if mse_01 > 0 else float("inf"),
    }


def mean_patch_baseline(train_images: Tensor, eval_images: Tensor, mask: PatchMask, patch: int) -> float:
    """MSE on replaced patches of the predictor that outputs the training set's mean patch at each position."""
    mean = patchify(train_images, patch).mean(0, keepdim=True)
    target = patchify(eval_images, patch)
    err = (target - mean).pow(2).sum(-1)
    rp = mask.replaced.to(err.dtype)
    return float((err * rp).sum() / (rp.sum() * target.shape[-1]))
