"""Image datasets: digits, MNIST (pkl / IDX), CIFAR-10 (python batches / JPEG tars), ImageFolder, errors."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from etbench.data import DatasetError
from etbench.data.image_formats import CIFAR10_CLASSES, files_sha256, read_idx
from etbench.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGE_DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_image_dataset,
    unnormalize,
)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent")
    return path


def _images(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _labels(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    return torch.round(unnormalize(x, mean, std) * 255).to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------------ digits


def test_digits_counts_shapes_and_exact_pixels():
    s = load_image_dataset("digits")
    assert (len(s.train), len(s.val), len(s.test)) == (1294, 144, 359)  # 1797 = 1438 (train+val) + 359 (20 % test)
    assert s.image_shape == (1, 8, 8) and s.num_classes == 10 and s.name == "digits"
    x_tr = s.train.tensors[0]
    assert x_tr.dtype == torch.float32 and x_tr.shape == (1294, 1, 8, 8)
    # mean/std come from the training split: normalised train pixels have mean 0 and std 1
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std(unbiased=False)) - 1) < 1e-5
    # the three splits together are exactly sklearn's 1797 images (pixels 0..16) with their labels, as a multiset
    got = torch.cat([unnormalize(d.tensors[0], s.mean, s.std) * 16 for d in (s.train, s.val, s.test)])
    got_lab = torch.cat([d.tensors[1] for d in (s.train, s.val, s.test)]).numpy()
    rows = np.concatenate([np.rint(got.reshape(-1, 64).numpy()), got_lab[:, None]], axis=1)
    ref = load_digits()
    ref_rows = np.concatenate([ref.images.reshape(-1, 64), ref.target[:, None]], axis=1)
    assert np.array_equal(rows[np.lexsort(rows.T[::-1])], ref_rows[np.lexsort(ref_rows.T[::-1])])
    assert len(s.checksum) == 64


def test_digits_determinism_and_limits():
    a, b, c = (load_image_dataset("digits", seed=seed) for seed in (0, 0, 1))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(a.train.tensors[1], c.train.tensors[1])  # another seed, another train/val carve
    assert a.mean != c.mean  # train-split statistics follow the carve
    # the test split is seed-independent (same images, compared in pixel space since mean/std differ per seed)
    assert torch.equal(a.test.tensors[1], c.test.tensors[1])
    assert torch.allclose(unnormalize(a.test.tensors[0], a.mean, a.std), unnormalize(c.test.tensors[0], c.mean, c.std))
    small = load_image_dataset("digits", seed=0, limit_train=10, limit_eval=5)
    assert (len(small.train), len(small.val), len(small.test)) == (10, 5, 5)
    assert torch.equal(small.train.tensors[0], a.train.tensors[0][:10])  # a prefix of the full seeded carve


# ------------------------------------------------------------------------------------------------------- MNIST


def test_shipped_mnist_pkl_full_and_matches_idx(shared_data):
    root = _need(shared_data / "mnist" / "mnist.pkl.gz").parent
    s = load_image_dataset("mnist", root)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.image_shape == (1, 28, 28) and (s.mean, s.std) == (MNIST_MEAN, MNIST_STD)
    assert s.train.tensors[0].shape == (54000, 1, 28, 28) and s.train.tensors[0].dtype == torch.float32
    assert s.checksum == files_sha256([root / "mnist.pkl.gz"])
    # the pkl test part equals the original t10k IDX files (pixels exactly, labels in order)
    t10k = read_idx(_need(root / "t10k-images-idx3-ubyte.gz"))
    assert t10k.shape == (10000, 28, 28) and t10k.dtype == np.uint8
    assert np.array_equal(_to_uint8(s.test.tensors[0][:8], s.mean, s.std)[:, 0], t10k[:8])
    assert np.array_equal(s.test.tensors[1].numpy(), read_idx(_need(root / "t10k-labels-idx1-ubyte.gz")))
    # train+val is the original 60k training set: same label histogram as train-labels-idx1
    train_labels = read_idx(_need(root / "train-labels-idx1-ubyte.gz"))
    both = torch.cat([s.train.tensors[1], s.val.tensors[1]]).numpy()
    assert np.array_equal(np.bincount(both), np.bincount(train_labels))


def test_shipped_mnist_with_limits(shared_data):
    root = _need(shared_data / "mnist" / "mnist.pkl.gz").parent
    s = load_image_dataset("mnist", root, seed=3, limit_train=100, limit_eval=20)
    assert (len(s.train), len(s.val), len(s.test)) == (100, 20, 20)
    assert set(s.test.tensors[1].tolist()) <= set(range(10))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    raw = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _torchvision_mnist(root: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    xs = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    ys = rng.integers(0, 10, n_train).astype(np.uint8), rng.integers(0, 10, n_test).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte.gz", xs[0])  # gz and plain both accepted
    _write_idx(raw / "train-labels-idx1-ubyte", ys[0])
    _write_idx(raw / "t10k-images-idx3-ubyte", xs[1])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", ys[1])
    return xs[0], ys[0], xs[1], ys[1]


def test_mnist_torchvision_raw_layout(tmp_path):
    x_tr, y_tr, x_te, y_te = _torchvision_mnist(tmp_path)
    s = load_image_dataset("mnist", tmp_path, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 10)
    assert np.array_equal(_to_uint8(s.test.tensors[0], s.mean, s.std)[:, 0], x_te)
    assert np.array_equal(s.test.tensors[1].numpy(), y_te)
    # train+val recombine to the training file (each image once, with its label)
    imgs = np.concatenate([_to_uint8(d.tensors[0], s.mean, s.std)[:, 0] for d in (s.train, s.val)])
    labs = torch.cat([s.train.tensors[1], s.val.tensors[1]]).numpy()
    order = [int(np.flatnonzero((x_tr == im).all(axis=(1, 2)))[0]) for im in imgs]
    assert sorted(order) == list(range(30)) and np.array_equal(labs, y_tr[order])
    # normalisation is (x/255 - 0.1307) / 0.3081, checked on one pixel by hand
    assert float(s.test.tensors[0][0, 0, 0, 0]) == pytest.approx((x_te[0, 0, 0] / 255 - 0.1307) / 0.3081, abs=1e-6)
    # checksum covers the bytes: change one byte, the checksum changes
    before = s.checksum
    p = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    assert load_image_dataset("mnist", tmp_path, val_fraction=0.2).checksum != before


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(DatasetError, match=str(bad)):
        read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + bytes(3))  # header says 5 bytes, holds 3
    with pytest.raises(DatasetError, match="holds 3 bytes"):
        read_idx(short)


# ---------------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batches(root: Path, per_batch: int = 4, n_test: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    test = None
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        (d / name).write_bytes(pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=2))
        test = (data, np.array(labels))
    return test  # type: ignore[return-value]


def test_cifar_python_batches(tmp_path):
    x_te, y_te = _cifar_batches(tmp_path)
    s = load_image_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (15, 5, 5)
    assert s.image_shape == (3, 32, 32) and (s.mean, s.std) == (CIFAR10_MEAN, CIFAR10_STD)
    # rows are channel-major (1024 R, 1024 G, 1024 B), row by row
    assert np.array_equal(_to_uint8(s.test.tensors[0], s.mean, s.std), x_te.reshape(5, 3, 32, 32))
    assert np.array_equal(s.test.tensors[1].numpy(), y_te)
    x = s.test.tensors[0][0, 2, 0, 1]
    assert float(x) == pytest.approx((x_te[0, 2048 + 1] / 255 - 0.4465) / 0.2616, abs=1e-6)


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (str(self.target),))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _cifar_batches(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_3.*refusing to load global"):
        load_image_dataset("cifar10", tmp_path)
    assert not marker.exists()


def _jpeg(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_cifar_jpeg_tar_layout_synthetic(tmp_path):
    colors = {"cat": (200, 30, 30), "truck": (20, 40, 220)}
    for split, n in (("train", 4), ("test", 2)):
        with tarfile.open(tmp_path / f"cifar10_{split}_jpg.tar.gz", "w:gz") as tf:
            for cls, col in colors.items():
                for k in range(n):
                    _add(tf, f"{split}/{cls}/{k:04d}.jpg", _jpeg(col))
    s = load_image_dataset("cifar10", tmp_path, val_fraction=0.25)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 4)
    assert s.test.tensors[1].tolist() == [CIFAR10_CLASSES.index("cat")] * 2 + [CIFAR10_CLASSES.index("truck")] * 2
    px = _to_uint8(s.test.tensors[0], s.mean, s.std).astype(int)
    assert np.abs(px[0] - np.array(colors["cat"])[:, None, None]).max() <= 3  # JPEG is lossy by a few levels
    assert np.abs(px[3] - np.array(colors["truck"])[:, None, None]).max() <= 3
    # a corrupt member is reported by name when it is decoded
    with tarfile.open(tmp_path / "cifar10_test_jpg.tar.gz", "w:gz") as tf:
        _add(tf, "test/cat/0000.jpg", b"not a jpeg")
    with pytest.raises(DatasetError, match=r"test/cat/0000\.jpg"):
        load_image_dataset("cifar10", tmp_path)


def test_shipped_cifar_jpeg_with_limit(shared_data):
    root = _need(shared_data / "cifar10_jpg" / "cifar10_train_jpg.tar.gz").parent
    _need(root / "cifar10_test_jpg.tar.gz")
    s = load_image_dataset("cifar10", root, limit_train=40, limit_eval=8)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 8, 8)
    assert s.train.tensors[0].shape == (40, 3, 32, 32) and s.image_shape == (3, 32, 32)
    labels = torch.cat([d.tensors[1] for d in (s.train, s.val, s.test)])
    assert labels.min() >= 0 and labels.max() <= 9
    # oracle: the first test image is, pixel for pixel, one of the JPEGs in its label's class folder
    label = int(s.test.tensors[1][0])
    want = _to_uint8(s.test.tensors[0][:1], s.mean, s.std)[0].transpose(1, 2, 0)
    hits = 0
    with tarfile.open(root / "cifar10_test_jpg.tar.gz") as tf:
        for m in tf:
            if m.isfile() and m.name.startswith(f"test/{CIFAR10_CLASSES[label]}/"):
                hits += np.array_equal(np.asarray(Image.open(tf.extractfile(m)).convert("RGB")), want)
    assert hits >= 1


# ------------------------------------------------------------------------------------------------- ImageFolder


def _folder(root: Path, n_train: int = 6, n_val: int = 2) -> dict[str, tuple[int, int, int]]:
    colors = {"ant": (255, 0, 0), "bee": (0, 128, 255)}
    for sub, n in (("train", n_train), ("val", n_val)):
        for cls, col in colors.items():
            (root / sub / cls).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (40 + k, 30), col).save(root / sub / cls / f"{k}.png")
    return colors


def test_image_folder_splits_transforms_and_checksum(tmp_path):
    colors = _folder(tmp_path / "a")
    s = load_image_dataset("imagefolder", tmp_path / "a", val_fraction=0.25, image_size=32)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 4)
    assert s.image_shape == (3, 32, 32) and s.num_classes == 2 and (s.mean, s.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert _labels(s.test) == [0, 0, 1, 1]
    # eval transform of a constant-colour image = the ImageNet-normalised colour everywhere
    for img, lab in zip(_images(s.test), _labels(s.test), strict=True):
        col = colors[("ant", "bee")[lab]]
        want = [(c / 255 - m) / sd for c, m, sd in zip(col, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
        assert torch.allclose(img, torch.tensor(want).reshape(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    assert load_image_dataset("imagenet", tmp_path / "a", limit_eval=1).test[0][0].shape == (3, 224, 224)
    # checksum: location-independent, changes when a file changes size
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_image_dataset("imagefolder", tmp_path / "b").checksum == s.checksum
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "b" / "val" / "bee" / "0.png")
    assert load_image_dataset("imagefolder", tmp_path / "b").checksum != s.checksum


def test_image_folder_errors(tmp_path):
    _folder(tmp_path)
    (tmp_path / "val" / "ant" / "9.png").write_bytes(b"garbage")
    s = load_image_dataset("imagefolder", tmp_path, image_size=16)
    with pytest.raises(DatasetError, match=r"9\.png"):
        _images(s.test)
    shutil.rmtree(tmp_path / "val" / "bee")
    with pytest.raises(DatasetError, match="class folders differ"):
        load_image_dataset("imagefolder", tmp_path)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'val'}.*train/<class>"):
        load_image_dataset("imagefolder", tmp_path)


# ------------------------------------------------------------------------------------------------------ errors


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="allowed: " + ", ".join(IMAGE_DATASETS)):
        load_image_dataset("fashion")
    with pytest.raises(DatasetError, match="needs root"):
        load_image_dataset("mnist")
    with pytest.raises(DatasetError, match="cifar10_jpg"):
        load_image_dataset("cifar10")
    with pytest.raises(DatasetError, match="takes no root"):
        load_image_dataset("digits", tmp_path)
    with pytest.raises(DatasetError, match="val_fraction"):
        load_image_dataset("digits", val_fraction=1.0)
    with pytest.raises(DatasetError, match="limit_train"):
        load_image_dataset("digits", limit_train=0)


def test_missing_and_corrupt_roots(tmp_path, shared_data):
    missing = tmp_path / "nowhere"
    for name, hint in (("mnist", "mnist.pkl.gz"), ("cifar10", "cifar-10-batches-py"), ("imagenet", "image-net.org")):
        with pytest.raises(DatasetError, match=rf"{missing}.*{hint}"):
            load_image_dataset(name, missing)
    with pytest.raises(DatasetError, match=rf"no MNIST files found under {tmp_path}"):
        load_image_dataset("mnist", tmp_path)
    pkl = _need(shared_data / "mnist" / "mnist.pkl.gz")
    (tmp_path / "mnist.pkl.gz").write_bytes(pkl.read_bytes()[:5000])  # truncated download
    with pytest.raises(DatasetError, match=str(tmp_path / "mnist.pkl.gz")):
        load_image_dataset("mnist", tmp_path)


def test_unnormalize_by_hand():
    x = torch.tensor([[[[0.0, 1.0]], [[-1.0, 10.0]]]])  # (1, 2, 1, 2)
    out = unnormalize(x, (0.5, 0.2), (0.25, 0.1))
    assert torch.allclose(out, torch.tensor([[[[0.5, 0.75]], [[0.1, 1.0]]]]))  # 0.2 + 10 * 0.1 = 1.2 → clamped
    with pytest.raises(ValueError, match="len\\(mean\\)=3"):
        unnormalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_digits_read_without_sklearn_equals_sklearn_loader() -> None:
    """The direct CSV read (no scikit-learn import in every worker) yields exactly ``load_digits``'s arrays."""
    from sklearn.datasets import load_digits

    from etbench.data.images import _digits_arrays

    images, labels = _digits_arrays()
    ref = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, ref.images.astype(np.uint8))
    np.testing.assert_array_equal(labels, ref.target.astype(np.int64))
