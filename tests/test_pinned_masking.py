"""Masked completion numbers (SPEC §2) pinned against hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from etbench.tasks.image_completion import PatchMask, draw_mask, patch_losses, summarise


@pytest.mark.parametrize(("n", "chosen", "replaced"), [(16, 8, 7), (64, 32, 29), (196, 98, 88), (20, 10, 9)])
def test_draw_mask_counts(n: int, chosen: int, replaced: int) -> None:
    """round(0.5·N) chosen per image; round(0.9·chosen) of them replaced by MASK, the rest stay visible."""
    m = draw_mask(6, n, 0.5, torch.Generator().manual_seed(0))
    assert m.chosen.shape == m.replaced.shape == (6, n) and m.chosen.dtype == torch.bool
    assert (m.chosen.sum(1) == chosen).all() and (m.replaced.sum(1) == replaced).all()
    assert not (m.replaced & ~m.chosen).any()  # replaced ⊆ chosen
    visible_chosen = m.chosen & ~m.replaced
    assert (visible_chosen.sum(1) == chosen - replaced).all()
    assert len({tuple(r.tolist()) for r in m.chosen}) > 1  # per image, not one mask for the batch
    again = draw_mask(6, n, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again.chosen, m.chosen) and torch.equal(again.replaced, m.replaced)


def test_patch_losses_and_psnr_by_hand() -> None:
    """One 2-channel 4×4 image, patch 2 → 4 patches of 8 values (c, h, w). Patch k is off by e_k in channel 1
    only; chosen = {0, 1, 2}, replaced = {0, 1}."""
    images = torch.zeros(1, 2, 4, 4)
    e = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pred = torch.zeros(1, 4, 8)
    pred[0, :, 4:] = e[:, None]  # channel-major patches: values 4..7 are channel 1
    mask = PatchMask(chosen=torch.tensor([[True, True, True, False]]),
                     replaced=torch.tensor([[True, True, False, False]]))
    std = torch.tensor([0.5, 0.25])
    losses = patch_losses(pred, images, mask, patch=2, std=std)
    # loss: squared error summed over chosen patches' 8 values each, divided by 3·8 values
    want_loss = 4 * (0.1**2 + 0.2**2 + 0.3**2) / 24
    want_masked = 4 * (0.1**2 + 0.2**2) / 16
    assert float(losses.loss()) == pytest.approx(want_loss)
    m = summarise(losses.as_tensor())
    assert m["loss"] == m["mse_chosen"] == pytest.approx(want_loss)
    assert m["mse_masked"] == pytest.approx(want_masked)
    # [0, 1] pixel error = normalised error · std of its channel (0.25 for channel 1)
    mse_01 = 4 * ((0.1 * 0.25) ** 2 + (0.2 * 0.25) ** 2) / 16
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / mse_01))
    # errors in channel 0 are scaled by 0.5 instead: a channel-order bug changes the PSNR
    pred0 = torch.zeros(1, 4, 8)
    pred0[0, :, :4] = e[:, None]
    m0 = summarise(patch_losses(pred0, images, mask, 2, std).as_tensor())
    assert m0["mse_masked"] == pytest.approx(want_masked)
    assert m0["psnr"] == pytest.approx(10 * math.log10(1 / (4 * ((0.1 * 0.5) ** 2 + (0.2 * 0.5) ** 2) / 16)))
    # sums aggregate exactly over batches: two halves give the metrics of the whole
    both = summarise(losses.as_tensor() + patch_losses(pred0, images, mask, 2, std).as_tensor())
    assert both["mse_masked"] == pytest.approx(want_masked)


def test_model_sees_only_replaced_patches_as_mask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The task feeds ``mask.replaced`` (not ``chosen``) to the model and scores the loss over ``chosen``."""
    from etbench.config import resolve_run_config
    from etbench.engine.build import build_task

    cfg = resolve_run_config({"task": {"dataset": "digits", "limit_train": 32, "limit_eval": 16},
                              "train": {"batch_size": 8}})
    task = build_task(cfg, torch.device("cpu"))
    images, mask = next(iter(task.train_batches(0)))
    seen: list[torch.Tensor] = []

    class Probe(torch.nn.Module):
        patch = 2

        def forward(self, x: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
            seen.append(replaced)
            from etbench.models.image import patchify

            return patchify(x, task.patch) + 1.0  # every value off by exactly 1

    loss = task.train_loss(Probe(), (images, mask))
    assert torch.equal(seen[0], mask.replaced) and not torch.equal(seen[0], mask.chosen)
    assert float(loss) == pytest.approx(1.0)  # mean over chosen patches of (1)²
