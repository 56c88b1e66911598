"""Raw readers for the published graph anomaly detection file formats, returning plain numpy arrays.

Each reader checks the layout it expects and raises ``DatasetError`` naming the file and the missing/bad field.
Cleaning (symmetrising, de-duplicating, dropping self-loops) and conversion to torch happen in ``graphs.py``.
Formats: MATLAB ``Network``/``Attributes``/``Label`` (TAM/GGAD family), CARE-GNN ``.mat`` (Dou et al., CIKM 2020),
the heterophilous-graphs / GADBench ``.npz`` (Platonov et al., ICLR 2023), PyGOD/BOND ``.pt.zip`` (Liu et al., NeurIPS
2022; read with a restricted unpickler, never plain ``pickle``) and DGL binary graphs (optional ``dgl``).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse as sp

from etbench.data import DatasetError

NPZ_KEYS = ("node_features", "node_labels", "edges")
NPZ_MASK_KEYS = {"train": "train_masks", "val": "val_masks", "test": "test_masks"}
NPZ_RELATION_PREFIX = "relation_edges__"  # etbench extension: per-relation edge lists (E, 2) in the same npz
MAT_NETWORK_KEYS = ("Network", "Attributes", "Label")


@dataclass
class RawGraph:
    """A graph as read from disk: edges may be one-directional, duplicated or contain self-loops."""

    x: np.ndarray  # (N, F)
    y: np.ndarray  # (N,) int64 in {-1, 0, 1}
    edges: dict[str, np.ndarray]  # relation -> (2, E) int64
    splits: dict[str, np.ndarray] | None = None  # {"train","val","test"} -> (S, N) bool
    anomaly_type: np.ndarray | None = None  # (N,) int64 bit field for injected anomalies: 1 contextual, 2 structural


# ---------------------------------------------------------------------------------------------- MATLAB .mat files


def _loadmat(path: Path, layout: str) -> dict[str, Any]:
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # scipy raises this for MATLAB v7.3 (HDF5) files
        raise DatasetError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it with -v7 ({layout})") from e
    except Exception as e:
        raise DatasetError(f"{path}: not a readable MATLAB .mat file ({e}); expected {layout}") from e


def _require(m: dict[str, Any], keys: tuple[str, ...], path: Path, layout: str) -> None:
    missing = [k for k in keys if k not in m]
    if missing:
        found = sorted(k for k in m if not k.startswith("__"))
        raise DatasetError(f"{path}: missing key(s) {missing}; expected {layout}; found {found}")


def _dense_features(a: Any, path: Path, key: str) -> np.ndarray:
    x = a.toarray() if sp.issparse(a) else np.asarray(a)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: {key!r} must be a numeric (N, F) matrix, got shape {x.shape} dtype {x.dtype}")
    return x.astype(np.float32)


def _adjacency_edges(a: Any, n: int, path: Path, key: str) -> np.ndarray:
    if not (sp.issparse(a) or isinstance(a, np.ndarray)) or a.shape != (n, n):
        got = getattr(a, "shape", type(a))
        raise DatasetError(f"{path}: {key!r} must be an ({n}, {n}) adjacency matrix, got {got}")
    coo = sp.coo_matrix(a)
    coo.eliminate_zeros()
    return np.stack([coo.row, coo.col]).astype(np.int64)


def _labels(a: Any, n: int, path: Path, key: str) -> np.ndarray:
    y = np.asarray(a.toarray() if sp.issparse(a) else a).ravel()
    if y.shape != (n,):
        raise DatasetError(f"{path}: {key!r} must hold {n} labels, got shape {np.shape(a)}")
    if not np.issubdtype(y.dtype, np.number) or not np.array_equal(y, np.round(y)):
        raise DatasetError(f"{path}: {key!r} must hold integer labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def read_mat_network(path: Path) -> RawGraph:
    """``Network`` (N×N sparse adjacency), ``Attributes`` (N×F), ``Label`` (N×1): Amazon-UPU, Facebook (TAM/GGAD)."""
    layout = "MATLAB keys 'Network' (N×N sparse adjacency), 'Attributes' (N×F features), 'Label' (N×1, 1 = anomaly)"
    m = _loadmat(path, layout)
    _require(m, MAT_NETWORK_KEYS, path, layout)
    x = _dense_features(m["Attributes"], path, "Attributes")
    n = x.shape[0]
    edges = {"homo": _adjacency_edges(m["Network"], n, path, "Network")}
    return RawGraph(x=x, y=_labels(m["Label"], n, path, "Label"), edges=edges)


def read_care_gnn_mat(path: Path, relation_keys: tuple[str, ...], unlabelled_prefix: int = 0) -> RawGraph:
    """CARE-GNN YelpChi/Amazon: ``features`` (sparse N×F), ``label`` (1×N), one sparse adjacency per ``net_*`` key.

    Relations are named by the key without ``net_`` (``rur``, ``upu``…). The ``homo`` key is ignored on purpose: the
    homogeneous graph is rebuilt as the union of the relations. The first ``unlabelled_prefix`` nodes get label -1
    (CARE-GNN Amazon: users 0..3304 are unlabelled, as in the CARE-GNN and BWGNN split code).
    """
    layout = f"CARE-GNN MATLAB keys 'features' (sparse N×F), 'label' (1×N) and relations {list(relation_keys)}"
    m = _loadmat(path, layout)
    _require(m, ("features", "label", *relation_keys), path, layout)
    x = _dense_features(m["features"], path, "features")
    n = x.shape[0]
    y = _labels(m["label"], n, path, "label")
    if unlabelled_prefix:
        if n <= unlabelled_prefix:
            raise DatasetError(f"{path}: expected more than {unlabelled_prefix} nodes (the first {unlabelled_prefix} "
                               f"are unlabelled in this layout), got {n}")
        y[:unlabelled_prefix] = -1
    edges = {k.removeprefix("net_"): _adjacency_edges(m[k], n, path, k) for k in relation_keys}
    return RawGraph(x=x, y=y, edges=edges)


# ---------------------------------------------------------------------------------------- heterophilous / GADBench npz

NPZ_LAYOUT = ("npz arrays 'node_features' (N, F), 'node_labels' (N,), 'edges' (E, 2), optionally "
              "'train_masks'/'val_masks'/'test_masks' (S, N) bool")


def read_gad_npz(path: Path) -> RawGraph:
    """The heterophilous-graphs layout (Tolokers) that ``write_gad_npz`` also writes; no pickles allowed."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({e}); expected {NPZ_LAYOUT}") from e
    _require(arrays, NPZ_KEYS, path, NPZ_LAYOUT)
    x = arrays["node_features"]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: 'node_features' must be a numeric (N, F) array, got shape {x.shape} {x.dtype}")
    n = x.shape[0]
    edges = {"homo": _edge_list(arrays["edges"], path, "edges")}
    rel = {k.removeprefix(NPZ_RELATION_PREFIX): _edge_list(v, path, k)
           for k, v in arrays.items() if k.startswith(NPZ_RELATION_PREFIX)}
    present = [k for k in NPZ_MASK_KEYS.values() if k in arrays]
    if present and len(present) != len(NPZ_MASK_KEYS):
        raise DatasetError(f"{path}: has {present} but not all of {list(NPZ_MASK_KEYS.values())}")
    splits = None
    if present:
        splits = {s: _masks(arrays[k], n, path, k) for s, k in NPZ_MASK_KEYS.items()}
    kind = arrays.get("anomaly_type")
    return RawGraph(x=x.astype(np.float32), y=_labels(arrays["node_labels"], n, path, "node_labels"),
                    edges=rel or edges, splits=splits, anomaly_type=None if kind is None else kind.astype(np.int64))


def _edge_list(e: np.ndarray, path: Path, key: str) -> np.ndarray:
    if e.ndim != 2 or e.shape[1] != 2 or not np.issubdtype(e.dtype, np.integer):
        raise DatasetError(f"{path}: {key!r} must be an integer (E, 2) edge list, got shape {e.shape} dtype {e.dtype}")
    return e.T.astype(np.int64)


def _masks(m: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    m = m[None] if m.ndim == 1 else m
    if m.ndim != 2 or m.shape[1] != n or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
        raise DatasetError(f"{path}: {key!r} must be (S, {n}) boolean masks, got shape {m.shape} dtype {m.dtype}")
    return m.astype(bool)


def write_gad_npz(path: Path, raw: RawGraph) -> None:
    """Write ``raw`` in the layout ``read_gad_npz`` reads (each undirected edge once, as (E, 2))."""
    arrays: dict[str, np.ndarray] = {"node_features": raw.x, "node_labels": raw.y, "edges": np.empty((0, 2), np.int64)}
    if list(raw.edges) == ["homo"]:
        arrays["edges"] = raw.edges["homo"].T
    else:
        arrays |= {NPZ_RELATION_PREFIX + r: e.T for r, e in raw.edges.items()}
        arrays["edges"] = np.concatenate([e.T for e in raw.edges.values()])
    if raw.splits is not None:
        arrays |= {NPZ_MASK_KEYS[s]: m for s, m in raw.splits.items()}
    if raw.anomaly_type is not None:
        arrays["anomaly_type"] = raw.anomaly_type
    with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
        np.savez_compressed(f, **arrays)


# ---------------------------------------------------------------------------------------------- PyGOD .pt.zip

_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
                   "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                   "BoolStorage": "?"}
_PYG_CONTAINERS = {("torch_geometric.data.data", n) for n in ("Data", "DataEdgeAttr", "DataTensorAttr")} | {
    ("torch_geometric.data.storage", n) for n in ("GlobalStorage", "NodeStorage", "EdgeStorage", "BaseStorage")}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


class _Record:
    """Inert stand-in for a PyG container (Data, GlobalStorage…): it only keeps its pickled state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (instance dict, slots dict), either may be None
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a bounds-checked strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not isinstance(storage, np.ndarray) or len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise pickle.UnpicklingError(f"malformed tensor record (size {size}, stride {stride}, offset {offset})")
    if 0 in size:
        return np.empty(size, storage.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} stride {stride} overruns its storage of {storage.size}")
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(st * item for st in stride)).copy()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only tensors (as numpy arrays), OrderedDict and PyG containers; refuses every other global."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _PYG_CONTAINERS:
            return _Record
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        dtype, numel = np.dtype(pid[1].dtype), int(pid[4])
        raw = self.archive.read(f"{self.prefix}data/{pid[2]}")
        if len(raw) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {pid[2]} holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype, count=numel)


PYGOD_LAYOUT = ("a zip holding '<name>.pt', a torch.save archive of a torch_geometric Data with tensors "
                "'x' (N, F), 'edge_index' (2, E), 'y' (N,)")


def read_pyg_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of the PyG ``Data`` stored in a PyGOD ``.pt.zip``, as numpy arrays, without importing torch."""
    try:
        with zipfile.ZipFile(path) as outer:
            inner_names = [m for m in outer.namelist() if m.endswith(".pt")]
            if len(inner_names) != 1:
                raise DatasetError(f"{path}: expected exactly one '.pt' member, found {outer.namelist()}")
            inner = zipfile.ZipFile(io.BytesIO(outer.read(inner_names[0])))
        pkls = [m for m in inner.namelist() if m.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise DatasetError(f"{path}: '{inner_names[0]}' is not a torch.save archive (no unique */data.pkl)")
        prefix = pkls[0].removesuffix("data.pkl")
        root = _RestrictedUnpickler(inner.read(pkls[0]), inner, prefix).load()
    except DatasetError:
        raise
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: {e}; only plain tensors and PyG Data containers are accepted") from e
    except Exception as e:
        raise DatasetError(f"{path}: corrupt or unexpected PyGOD archive ({type(e).__name__}: {e}); "
                           f"expected {PYGOD_LAYOUT}") from e
    state = root.state if isinstance(root, _Record) else root
    if isinstance(state, dict) and isinstance(state.get("_store"), _Record):  # PyG >= 2.0: Data._store._mapping
        state = state["_store"].state
        state = state.get("_mapping") if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise DatasetError(f"{path}: the pickle root is not a PyG Data; expected {PYGOD_LAYOUT}")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def read_pygod_zip(path: Path) -> RawGraph:
    """PyGOD/BOND graph: binary label ``y > 0``; injected sets keep their bit field as ``anomaly_type``.

    The ``train/val/test_mask`` some files carry (inj_cora) are the source dataset's class-label splits, not anomaly
    detection splits, so they are not returned as stored splits.
    """
    t = read_pyg_tensors(path)
    _require(t, ("x", "edge_index", "y"), path, PYGOD_LAYOUT)
    x, ei, y = t["x"], t["edge_index"], t["y"]
    if x.ndim != 2 or ei.ndim != 2 or ei.shape[0] != 2 or y.shape != (x.shape[0],):
        raise DatasetError(f"{path}: bad shapes x {x.shape}, edge_index {ei.shape}, y {y.shape}; "
                           f"expected {PYGOD_LAYOUT}")
    y = y.astype(np.int64)
    kind = y.copy() if y.max(initial=0) > 1 else None
    return RawGraph(x=x.astype(np.float32), y=(y > 0).astype(np.int64), edges={"homo": ei.astype(np.int64)},
                    anomaly_type=kind)


# ---------------------------------------------------------------------------------------------- DGL binary graphs


def read_dgl_graph(path: Path) -> RawGraph:
    """T-Finance / T-Social (BWGNN, GADBench): ``ndata['feature']``, ``ndata['label']`` (one-hot → argmax)."""
    try:
        import dgl  # optional: only these two datasets need it
    except ImportError as e:
        raise ImportError(
            f"reading the DGL binary graph {path} needs the optional package 'dgl', which is not installed. Either "
            "install dgl, or convert the file once where dgl is installed with "
            "etbench.data.graphs.convert_dgl_to_npz(src, dst) and load the result with "
            "load_graph_dataset(name, path=dst)") from e
    try:
        g = dgl.load_graphs(str(path))[0][0]
    except Exception as e:
        raise DatasetError(f"{path}: not a readable DGL binary graph ({e})") from e
    if len(g.ntypes) != 1 or "feature" not in g.ndata or "label" not in g.ndata:
        raise DatasetError(f"{path}: expected one node type with ndata 'feature' and 'label', "
                           f"got node types {g.ntypes} and ndata {list(g.ndata)}")
    x, y = g.ndata["feature"].numpy(), g.ndata["label"].numpy()
    if y.ndim == 2:  # T-Finance stores one-hot labels (column 1 = anomaly)
        y = y.argmax(1)
    edges = {}
    for etype in g.canonical_etypes:
        src, dst = g.edges(etype=etype)
        edges[etype[1] if len(g.canonical_etypes) > 1 else "homo"] = np.stack([src.numpy(), dst.numpy()])
    return RawGraph(x=x.astype(np.float32), y=y.astype(np.int64), edges=edges)
