"""Image datasets for masked image completion: digits (embedded), MNIST, CIFAR-10 and ImageFolder/ImageNet.

Every loader gives an :class:`ImageSplits`: train/val/test datasets of (normalised float32 (C, H, W), label) items, the
per-channel mean/std used (so reconstructions can be un-normalised for PNGs) and a checksum of the raw files.
Splits are deterministic: val is carved out of the official train split with ``seed``; the test split (official, or
for digits a fixed 20 % carve) and any ``limit_eval`` subset of it do not depend on ``seed``, so every seed is scored
on the same test images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset

from etbench.data import DatasetError
from etbench.data.image_formats import ImagePool, files_sha256, read_cifar10, read_mnist
from etbench.data.paths import DATA_ENV, data_root, resolve_data_path

IMAGE_DATASETS = ("digits", "mnist", "cifar10", "imagefolder", "imagenet")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DIGITS_TEST_FRACTION = 0.2
_TEST_SEED = 20231210  # fixed: the digits test carve and every limit_eval test subset ignore the run seed
_FOLDER_HOWTO = {
    "imagefolder": "Expected <root>/train/<class>/<image> and <root>/val/<class>/<image> (torchvision ImageFolder).",
    "imagenet": (
        "Expected ImageNet-1k (ILSVRC2012, from https://image-net.org, registration required) as "
        "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, with the validation images sorted into class folders."
    ),
}


@dataclass(frozen=True)
class ImageSplits:
    """The three splits of one image dataset plus what is needed to un-normalise and track it."""

    name: str
    train: Dataset  # items: (image float32 tensor (C, H, W), normalised; label)
    val: Dataset
    test: Dataset
    image_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checksum: str
    num_classes: int


def load_image_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    image_size: int = 224,
    download: bool = False,
) -> ImageSplits:
    """Load ``name`` (one of IMAGE_DATASETS) from ``root``; ``limit_*`` keep a deterministic subset (at most N).

    ``image_size`` applies to imagefolder/imagenet only (digits, MNIST and CIFAR-10 keep their native size).
    """
    if name not in IMAGE_DATASETS:
        raise DatasetError(f"unknown image dataset {name!r}; allowed: {', '.join(IMAGE_DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for field, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DatasetError(f"{field} must be None or a positive int, got {value!r}")
    if download and name not in ("mnist", "cifar10"):
        raise DatasetError(f"download=True is only supported for mnist and cifar10, not {name!r}")
    if name == "digits":
        if root is not None:
            raise DatasetError(f"digits is bundled with scikit-learn and takes no root (got root={root!r})")
        return _load_digits(seed, val_fraction, limit_train, limit_eval)
    if root is None:
        where = "mnist" if name == "mnist" else "cifar10_jpg" if name == "cifar10" else "<your folder>"
        raise DatasetError(f"{name} needs root=<directory> (the copy shipped here is {data_root(check=False)}/{where}"
                           f"; a relative root resolves under ${DATA_ENV})")
    root = resolve_data_path(root)
    assert root is not None
    if name in ("imagefolder", "imagenet"):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise DatasetError(f"image_size must be a positive int, got {image_size!r}")
        return _load_image_folder(name, root, seed, val_fraction, limit_train, limit_eval, image_size)
    if download:
        _download(name, root)
    if name == "mnist":
        train_pool, test_pool, files = read_mnist(root)
        mean, std, shape = MNIST_MEAN, MNIST_STD, (1, 28, 28)
    else:
        train_pool, test_pool, files = read_cifar10(root)
        mean, std, shape = CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32)
    tr, va = split_train_val(len(train_pool), val_fraction, seed)
    te = _eval_subset(len(test_pool), limit_eval)
    return ImageSplits(
        name=name,
        train=_tensor_dataset(train_pool, tr[:limit_train], mean, std),
        val=_tensor_dataset(train_pool, va[:limit_eval], mean, std),
        test=_tensor_dataset(test_pool, te, mean, std),
        image_shape=shape,  # the readers check every image has this shape
        mean=mean,
        std=std,
        checksum=files_sha256(files),
        num_classes=10,
    )


def unnormalize(images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """Undo per-channel normalisation of (..., C, H, W) images and clamp to [0, 1] (ready for PNGs)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    if images.dim() < 3 or images.shape[-3] != m.shape[0] or s.shape[0] != m.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} need channel dim -3 of size len(mean)={m.shape[0]}")
    return (images * s + m).clamp(0.0, 1.0)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of range(n) cut into (train, val) with round(val_fraction * n) (≥ 1) val items."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return perm[n_val:], perm[:n_val]


def _eval_subset(n: int, limit: int | None) -> np.ndarray:
    """All test indices in file order, or a seed-independent random subset of ``limit`` of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(_TEST_SEED).permutation(n)[:limit])


def _normalised(pixels01: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels01, dtype=np.float32))
    m = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return (x - m) / s


def _tensor_dataset(pool: ImagePool, idx: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
    pixels = pool.take(idx).astype(np.float32) / 255.0
    return TensorDataset(_normalised(pixels, mean, std), torch.from_numpy(pool.labels[idx].copy()))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 digits images (uint8, 0..16) and labels, read straight from the CSV that scikit-learn ships —
    importing scikit-learn alone costs ~1 s, paid by every trial and worker process; falls back to
    ``sklearn.datasets.load_digits`` when the file is not where scikit-learn keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8).astype(np.uint8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def _load_digits(seed: int, val_fraction: float, limit_train: int | None, limit_eval: int | None) -> ImageSplits:
    """scikit-learn's 8×8 digits (pixels 0..16 → [0, 1]); fixed 20 % test carve, mean/std from the train split."""
    images, labels = _digits_arrays()
    checksum = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    n = len(labels)
    perm = np.random.default_rng(_TEST_SEED).permutation(n)
    n_test = round(DIGITS_TEST_FRACTION * n)
    test_idx, pool_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    tr, va = split_train_val(len(pool_idx), val_fraction, seed)
    tr, va = pool_idx[tr], pool_idx[va]
    te = test_idx[_eval_subset(len(test_idx), limit_eval)]
    pixels = images[:, None].astype(np.float32) / 16.0
    mean, std = (float(pixels[tr].mean()),), (float(pixels[tr].std()),)

    def ds(idx: np.ndarray) -> Dataset:
        return TensorDataset(_normalised(pixels[idx], mean, std), torch.from_numpy(labels[idx]))

    return ImageSplits(
        name="digits",
        train=ds(tr[:limit_train]),
        val=ds(va[:limit_eval]),
        test=ds(te),
        image_shape=(1, 8, 8),
        mean=mean,
        std=std,
        checksum=checksum,
        num_classes=10,
    )


def _download(name: str, root: Path) -> None:
    """Fetch MNIST / CIFAR-10 into ``root`` with torchvision (its raw layouts are the ones read above)."""
    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    try:
        cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"download of {name} into {root} failed: {e}") from e


def load_rgb(path: str) -> Image.Image:
    """ImageFolder loader that names the file when an image cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"cannot decode image {path}: {e}") from e


class _TransformedSubset(Dataset):
    """``indices`` of an ImageFolder with its own transform (train and val share one folder scan)."""

    def __init__(self, base: Any, indices: np.ndarray, transform: Any) -> None:
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def folder_transforms(image_size: int) -> tuple[Any, Any]:
    """The ET paper's ImageNet pipeline: train = RandomResizedCrop + flip + ColorJitter; eval = Resize + CenterCrop."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), *norm]
    )
    evaluate = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *norm])
    return train, evaluate


def _load_image_folder(
    name: str, root: Path, seed: int, val_fraction: float, limit_train: int | None, limit_eval: int | None, size: int
) -> ImageSplits:
    """root/train → train + val (carved with ``seed``), root/val → test; checksum over file names + sizes."""
    from torchvision.datasets import ImageFolder

    bases = []
    for sub in ("train", "val"):
        d = root / sub
        if not d.is_dir():
            raise DatasetError(f"{name}: directory {d} not found. {_FOLDER_HOWTO[name]}")
        try:
            bases.append(ImageFolder(str(d), loader=load_rgb))
        except (FileNotFoundError, OSError) as e:
            raise DatasetError(f"{name}: {d} holds no usable class folders ({e}). {_FOLDER_HOWTO[name]}") from e
    train_base, test_base = bases
    if train_base.classes != test_base.classes:
        raise DatasetError(
            f"{name}: class folders differ between {root / 'train'} ({len(train_base.classes)}) and "
            f"{root / 'val'} ({len(test_base.classes)}): {sorted(set(train_base.classes) ^ set(test_base.classes))[:5]}"
        )
    train_tf, eval_tf = folder_transforms(size)
    tr, va = split_train_val(len(train_base), val_fraction, seed)
    h = hashlib.sha256()
    for base in bases:  # cheap even for ImageNet: one stat per file, no image bytes read
        for path, _ in base.samples:
            h.update(f"{Path(path).relative_to(root).as_posix()}\t{os.stat(path).st_size}\n".encode())
    return ImageSplits(
        name=name,
        train=_TransformedSubset(train_base, tr[:limit_train], train_tf),
        val=_TransformedSubset(train_base, va[:limit_eval], eval_tf),
        test=_TransformedSubset(test_base, _eval_subset(len(test_base), limit_eval), eval_tf),
        image_shape=(3, size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        checksum=h.hexdigest(),
        num_classes=len(train_base.classes),
    )
