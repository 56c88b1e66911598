"""Raw on-disk readers for MNIST and CIFAR-10: IDX files, restricted pickles, JPEG tarballs.

Every reader returns :class:`ImagePool` objects holding uint8 pixels (N, C, H, W) and int64 labels, so the split /
normalisation code in :mod:`etbench.data.images` does not care which layout the files came in. Pickled formats are
read with :class:`RestrictedUnpickler`, which only rebuilds numpy arrays and plain builtins (never arbitrary code).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from etbench.data import DatasetError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

MNIST_HOWTO = (
    "Expected one of: <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's layout; "
    "`torchvision.datasets.MNIST(root, download=True)` or download=True creates it) or <root>/mnist.pkl.gz (the "
    "classic pickle of ((X, y), (Xv, yv), (Xt, yt)); the copy shipped with this workspace is in shared/data/mnist)."
)
CIFAR10_HOWTO = (
    "Expected one of: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch} (the official python batches; extract "
    "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html under root, or pass download=True) or "
    "<root>/cifar10_{train,test}_jpg.tar.gz (members <split>/<class>/<NNNN>.jpg; the copy shipped with this "
    "workspace is in shared/data/cifar10_jpg)."
)

# (module, name) pairs a pickle of numpy arrays / dicts / lists legitimately needs; everything else is refused.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        *((mod, n) for mod in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytearray", "complex")),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` allows only what numpy arrays and builtins need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def load_restricted_pickle(fh: BinaryIO, path: Path, encoding: str) -> Any:
    """Unpickle ``fh`` (read from ``path``) with :class:`RestrictedUnpickler`; any failure → DatasetError."""
    try:
        return RestrictedUnpickler(fh, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, OSError, zlib.error, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"cannot read pickle {path}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class ImagePool:
    """One official split (e.g. MNIST train) as int64 labels plus a function taking uint8 (n, C, H, W) pixels."""

    labels: np.ndarray
    take: Callable[[np.ndarray], np.ndarray]  # indices → uint8 images; lazy so JPEGs are decoded only when asked

    def __len__(self) -> int:
        return len(self.labels)


def array_pool(images: np.ndarray, labels: np.ndarray) -> ImagePool:
    """Pool over in-memory uint8 images (N, C, H, W)."""
    return ImagePool(labels=labels.astype(np.int64), take=lambda idx: images[idx])


def files_sha256(files: Sequence[Path]) -> str:
    """sha256 over (file name, size, bytes) of ``files`` in the given order; location-independent."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"corrupt gzip file {path}: {e}") from e
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read a LeCun IDX file (optionally gzipped): big-endian magic (0, 0, dtype, ndim), uint32 dims, raw data."""
    path = Path(path)
    data = _read_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic {data[:4].hex() or 'empty'}); {MNIST_HOWTO}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: IDX header says {dims} ({expected} bytes) but holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------------------- MNIST

_MNIST_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx_set(root: Path) -> list[Path] | None:
    """The four MNIST IDX files (uncompressed preferred) in root/MNIST/raw, root/raw or root, if all present."""
    for d in (root / "MNIST" / "raw", root / "raw", root):
        found = []
        for stem in _MNIST_IDX:
            hit = next((d / f"{stem}{ext}" for ext in ("", ".gz") if (d / f"{stem}{ext}").is_file()), None)
            found.append(hit)
        if all(found):
            return found  # type: ignore[return-value]
    return None


def _mnist_idx_pools(files: list[Path]) -> tuple[ImagePool, ImagePool]:
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in files)
    pools = []
    for x, y, px, py in ((x_tr, y_tr, files[0], files[1]), (x_te, y_te, files[2], files[3])):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DatasetError(f"{px}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
        if y.shape != (len(x),):
            raise DatasetError(f"{py}: expected {len(x)} labels to match {px.name}, got shape {y.shape}")
        pools.append(array_pool(x[:, None], y))
    return pools[0], pools[1]


def _mnist_pkl_pools(path: Path) -> tuple[ImagePool, ImagePool]:
    """mnist.pkl.gz: ((X, y), (Xv, yv), (Xt, yt)), X float32 [N, 784] = uint8 / 256; train = X + Xv (original 60k)."""
    with gzip.open(path, "rb") as fh:  # gzip errors surface inside the load and become DatasetError there
        parts = load_restricted_pickle(fh, path, encoding="latin1")
    try:
        (x, y), (xv, yv), (xt, yt) = parts
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: expected a tuple ((X, y), (Xv, yv), (Xt, yt)); {MNIST_HOWTO}") from e
    out = []
    for xs, ys in (((x, xv), (y, yv)), ((xt,), (yt,))):
        xa = np.concatenate([np.asarray(a) for a in xs])
        ya = np.concatenate([np.asarray(a) for a in ys])
        if xa.ndim != 2 or xa.shape[1] != 784 or ya.shape != (len(xa),):
            raise DatasetError(f"{path}: expected X [N, 784] with N labels, got X {xa.shape}, y {ya.shape}")
        pixels = np.rint(xa * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        out.append(array_pool(pixels, ya))
    return out[0], out[1]


def read_mnist(root: Path) -> tuple[ImagePool, ImagePool, list[Path]]:
    """Detect the MNIST layout under ``root``; return (train pool of 60k, test pool of 10k, files read)."""
    if not root.is_dir():
        raise DatasetError(f"MNIST root {root} does not exist or is not a directory. {MNIST_HOWTO}")
    idx_files = _find_idx_set(root)
    if idx_files is not None:
        return (*_mnist_idx_pools(idx_files), idx_files)
    pkl = root / "mnist.pkl.gz"
    if pkl.is_file():
        return (*_mnist_pkl_pools(pkl), [pkl])
    raise DatasetError(f"no MNIST files found under {root}. {MNIST_HOWTO}")


# ------------------------------------------------------------------------------------------------------ CIFAR-10


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        d = load_restricted_pickle(fh, path, encoding="bytes")
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a dict with b'data' and b'labels', got {type(d).__name__}")
    data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DatasetError(f"{path}: missing key b'data' or b'labels' (keys: {sorted(map(str, d))})")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DatasetError(f"{path}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_batch_pools(d: Path) -> tuple[ImagePool, ImagePool, list[Path]]:
    files = [d / f"data_batch_{i}" for i in range(1, 6)] + [d / "test_batch"]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise DatasetError(f"{d}: missing CIFAR-10 batch files {missing}. {CIFAR10_HOWTO}")
    batches = [_cifar_batch(p) for p in files]
    x_tr = np.concatenate([b[0] for b in batches[:5]])
    y_tr = np.concatenate([b[1] for b in batches[:5]])
    return array_pool(x_tr, y_tr), array_pool(*batches[5]), files


_JPG_MEMBER = re.compile(r"^(?:\./)?(train|test)/([^/]+)/[^/]+\.jpe?g$", re.IGNORECASE)


def _jpeg_tar_pool(path: Path, split: str) -> ImagePool:
    """Read every ``<split>/<class>/*.jpg`` member's bytes (one sequential pass); decode lazily in ``take``."""
    entries: list[tuple[str, int, bytes]] = []
    data = _read_maybe_gz(path)  # decompressing in one go and slicing members is ~2x faster than streaming "r:gz"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                match = _JPG_MEMBER.match(m.name)
                if not m.isfile() or match is None or match.group(1) != split:
                    continue
                if match.group(2) not in CIFAR10_CLASSES:
                    raise DatasetError(f"{path}: member {m.name} has unknown class {match.group(2)!r}")
                if m.offset_data + m.size > len(data):
                    raise DatasetError(f"{path}: member {m.name} is truncated")
                blob = data[m.offset_data : m.offset_data + m.size]
                entries.append((m.name, CIFAR10_CLASSES.index(match.group(2)), blob))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"cannot read tarball {path}: {type(e).__name__}: {e}") from e
    if not entries:
        raise DatasetError(f"{path}: no members {split}/<class>/*.jpg. {CIFAR10_HOWTO}")
    entries.sort(key=lambda e: e[0])
    names = [e[0] for e in entries]
    blobs = [e[2] for e in entries]

    def take(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), 3, 32, 32), dtype=np.uint8)
        it = tqdm(idx, desc=f"decode {path.name}", unit="img", disable=len(idx) < 5000, leave=False)
        for k, i in enumerate(it):
            try:
                with Image.open(io.BytesIO(blobs[i])) as im:
                    arr = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{path}: cannot decode member {names[i]}: {e}") from e
            if arr.shape != (32, 32, 3):
                raise DatasetError(f"{path}: member {names[i]} is {arr.shape}, expected (32, 32, 3)")
            out[k] = arr.transpose(2, 0, 1)
        return out

    return ImagePool(labels=np.array([e[1] for e in entries], dtype=np.int64), take=take)


def read_cifar10(root: Path) -> tuple[ImagePool, ImagePool, list[Path]]:
    """Detect the CIFAR-10 layout under ``root``; return (train pool of 50k, test pool of 10k, files read)."""
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 root {root} does not exist or is not a directory. {CIFAR10_HOWTO}")
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
            return _cifar_batch_pools(d)
    tars = [root / "cifar10_train_jpg.tar.gz", root / "cifar10_test_jpg.tar.gz"]
    if any(p.is_file() for p in tars):
        missing = [p.name for p in tars if not p.is_file()]
        if missing:
            raise DatasetError(f"{root}: missing {missing}. {CIFAR10_HOWTO}")
        return _jpeg_tar_pool(tars[0], "train"), _jpeg_tar_pool(tars[1], "test"), tars
    raise DatasetError(f"no CIFAR-10 files found under {root}. {CIFAR10_HOWTO}")
