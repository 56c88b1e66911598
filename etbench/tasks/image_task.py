"""The masked-image-completion task as the training loop sees it: sharded batches, loss, metrics, artifacts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from etbench.config import ImageTaskConfig, RunConfig
from etbench.data.images import ImageSplits, unnormalize
from etbench.models.energy import EnergyTrace
from etbench.models.image import ImageET, MaskedPatchModel, patchify, unpatchify
from etbench.tasks.image_completion import PatchMask, draw_mask, patch_losses, summarise
from etbench.tasks.image_grid import memory_grid, save_png, tile

EVAL_MASK_SEED = 1_000_003  # eval masks are fixed per split, independent of the run seed (paired comparisons)


class _Indexed(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.base[i][0], i


class ImageTask:
    """Masked image completion for one run; ``rank``/``world`` shard the data like a DistributedSampler."""

    best_metric = "val/mse_masked"
    best_mode = "min"

    def __init__(self, cfg: RunConfig, splits: ImageSplits, patch: int, device: torch.device,
                 rank: int = 0, world: int = 1, input_dtype: torch.dtype = torch.float32) -> None:
        assert isinstance(cfg.task, ImageTaskConfig)
        self.cfg, self.splits, self.patch, self.device = cfg, splits, patch, device
        self.rank, self.world, self.input_dtype = rank, world, input_dtype
        _, h, w = splits.image_shape
        self.num_patches = (h // patch) * (w // patch)
        self.std = torch.tensor(splits.std)
        per_worker = cfg.train.batch_size // (world * cfg.dist.grad_accum)
        if per_worker < 1:
            raise ValueError(f"train.batch_size {cfg.train.batch_size} is smaller than workers × grad_accum "
                             f"({world} × {cfg.dist.grad_accum})")
        self.micro_batch = per_worker
        self.train_sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True,
                                                seed=cfg.train.seed, drop_last=False)
        self.samples_per_epoch = len(self.train_sampler)
        self.eval_masks = {name: self._eval_mask(name, len(ds)) for name, ds in (("val", splits.val),
                                                                                   ("test", splits.test))}

    # --- training ----------------------------------------------------------------------------------------
    def _eval_mask(self, name: str, n: int) -> PatchMask:
        gen = torch.Generator().manual_seed(EVAL_MASK_SEED + (0 if name == "val" else 1))
        return draw_mask(n, self.num_patches, self.cfg.task.mask_ratio, gen)

    def num_train_batches(self) -> int:
        return -(-len(self.train_sampler) // self.micro_batch)

    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, PatchMask]]:
        self.train_sampler.set_epoch(epoch)
        loader = DataLoader(self.splits.train, batch_size=self.micro_batch, sampler=self.train_sampler,
                            num_workers=0, drop_last=False)
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch * 7919 + self.rank)
        for images, _ in loader:
            yield images, draw_mask(images.shape[0], self.num_patches, self.cfg.task.mask_ratio, gen)

    def _to_device(self, images: Tensor, mask: PatchMask) -> tuple[Tensor, PatchMask]:
        images = images.to(self.device, self.input_dtype, non_blocking=True)
        return images, PatchMask(mask.chosen.to(self.device), mask.replaced.to(self.device))

    def train_loss(self, model: nn.Module, batch: tuple[Tensor, PatchMask]) -> Tensor:
        images, mask = self._to_device(*batch)
        pred = model(images, mask.replaced)
        return patch_losses(pred, images, mask, self.patch, self.std).loss()

    # --- evaluation --------------------------------------------------------------------------------------
    def _eval_loader(self, ds: Dataset) -> DataLoader:
        idx = list(range(self.rank, len(ds), self.world))  # exact shard, no padding duplicates
        return DataLoader(torch.utils.data.Subset(_Indexed(ds), idx), batch_size=max(self.micro_batch, 64))

    def evaluate(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        return {**self.evaluate_split(model, "val", reduce), **self.evaluate_split(model, "test", reduce)}

    def evaluate_split(self, model: nn.Module, name: str, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Metrics ``<name>/<metric>`` on one evaluation split ("val" or "test"), under its fixed masks."""
        ds = {"val": self.splits.val, "test": self.splits.test}[name]
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        masks = self.eval_masks[name]
        for images, idx in self._eval_loader(ds):
            mask = PatchMask(masks.chosen[idx], masks.replaced[idx])
            images, mask = self._to_device(images, mask)
            pred = model(images, mask.replaced)
            totals += patch_losses(pred, images, mask, self.patch, self.std).as_tensor().double()
        return {f"{name}/{k}": v for k, v in summarise(reduce(totals).cpu()).items()}

    def eval_batch(self, n: int, split: str = "val") -> tuple[Tensor, PatchMask]:
        ds = self.splits.val if split == "val" else self.splits.test
        n = min(n, len(ds))
        images = torch.stack([ds[i][0] for i in range(n)])
        m = self.eval_masks[split]
        return images, PatchMask(m.chosen[:n], m.replaced[:n])

    # --- artifacts (rank 0) ------------------------------------------------------------------------------
    def energy_trace(self, model: nn.Module, n: int) -> EnergyTrace | None:
        """Energy trace of the (trained) ET on the first ``n`` validation images; None for baselines."""
        core = getattr(model, "module", model)
        if not isinstance(core, ImageET):
            return None
        images, mask = self._to_device(*self.eval_batch(n))
        with torch.no_grad():
            _, tr = core.descend_with_trace(images, mask.replaced)
        return tr

    def write_artifacts(self, model: nn.Module, out: Path, n: int = 8) -> list[Path]:
        """reconstruction.png (masked input | reconstruction | original) and, for the ET, memories.png.

        The images are the first ``n`` test images under the fixed test masks (``EVAL_MASK_SEED``): the same
        images and masks for every model, seed and configuration of a dataset, so reconstructions compare side by
        side; they are shown, never selected on."""
        core: MaskedPatchModel = getattr(model, "module", model)
        images, mask = self._to_device(*self.eval_batch(n, "test"))
        with torch.no_grad():
            pred = core(images, mask.replaced).float()
        images = images.float()
        shape = self.splits.image_shape
        masked = patchify(images, self.patch).clone()
        masked[mask.replaced] = float("nan")
        masked_img = unpatchify(masked, shape, self.patch)
        mean, std = self.splits.mean, self.splits.std
        rows = [unnormalize(masked_img.nan_to_num(0.0), mean, std), unnormalize(unpatchify(pred, shape, self.patch),
                                                                                 mean, std),
                unnormalize(images, mean, std)]
        rows[0] = torch.where(masked_img.isnan(), torch.full_like(rows[0], 0.5), rows[0])
        grid = tile(torch.cat(rows).cpu(), nrow=images.shape[0], padding=1, pad_value=1.0)
        paths = [out / "reconstruction.png"]
        save_png(_upscale(grid), paths[0])
        if isinstance(core, ImageET):
            with torch.no_grad():
                mem = memory_grid(core.memories_as_patches().float().cpu(), shape[0], self.patch)
            paths.append(out / "memories.png")
            save_png(_upscale(mem), paths[1])
        return paths

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.splits.name, "checksum": self.splits.checksum,
                "image_shape": list(self.splits.image_shape), "train": len(self.splits.train),
                "val": len(self.splits.val), "test": len(self.splits.test)}


def _upscale(img: Tensor, min_side: int = 256) -> Tensor:
    """Nearest-neighbour upscaling so tiny (8×8) images are visible in a PNG viewer."""
    side = min(img.shape[-2:])
    k = max(1, min_side // max(1, side))
    return img.repeat_interleave(k, -2).repeat_interleave(k, -1) if k > 1 else img
