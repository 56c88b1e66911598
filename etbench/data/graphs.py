"""The common graph structure for node-level anomaly detection and ``load_graph_dataset`` (SPEC §3).

Every loader returns a ``GraphData`` whose edges are symmetric, de-duplicated and free of self-loops (models add
self-loops themselves when they want them), with labels 1 = anomaly, 0 = normal, -1 = unlabelled.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from etbench.data import DatasetError
from etbench.data.graph_formats import (
    NPZ_LAYOUT,
    PYGOD_LAYOUT,
    RawGraph,
    read_care_gnn_mat,
    read_dgl_graph,
    read_gad_npz,
    read_mat_network,
    read_pygod_zip,
    write_gad_npz,
)
from etbench.data.paths import data_root, resolve_data_path
from etbench.data.synthetic_graph import SyntheticGraphConfig, generate_synthetic_graph
from etbench.hashing import canonical_json


@dataclass
class GraphData:
    """One node-level anomaly detection graph; all tensors on CPU."""

    name: str
    x: torch.Tensor  # (N, F) float32 node features
    y: torch.Tensor  # (N,) int64: 1 anomaly, 0 normal, -1 unlabelled
    edge_index: torch.Tensor  # (2, E) int64: union of all relations, symmetric, deduplicated, no self-loops
    relations: dict[str, torch.Tensor]  # per relation, same conventions; single-relation graphs: {"homo": edge_index}
    splits: dict[str, torch.Tensor] | None  # stored splits {"train","val","test"} each (S, N) bool, or None
    checksum: str  # sha256 of the source file bytes (of the generator parameters for synthetic graphs)
    synthetic: bool = False
    anomaly_type: torch.Tensor | None = None  # (N,) int64 bit field of injected sets: 1 contextual, 2 structural

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        """Undirected edges (each stored in both directions in ``edge_index``)."""
        return int(self.edge_index.shape[1]) // 2

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_anomalies(self) -> int:
        return int((self.y == 1).sum())

    @property
    def labelled_mask(self) -> torch.Tensor:
        return self.y >= 0

    def summary(self) -> dict[str, int | float | str | bool]:
        """Flat scalar counts, ready for logs and tracking params."""
        labelled = int(self.labelled_mask.sum())
        out: dict[str, int | float | str | bool] = {
            "name": self.name, "num_nodes": self.num_nodes, "num_edges": self.num_edges,
            "num_features": self.num_features, "num_labelled": labelled, "num_anomalies": self.num_anomalies,
            "anomaly_rate": self.num_anomalies / labelled if labelled else float("nan"),
            "num_relations": len(self.relations),
            "num_splits": 0 if self.splits is None else int(self.splits["train"].shape[0]),
            "synthetic": self.synthetic, "checksum": self.checksum,
        }
        if list(self.relations) != ["homo"]:
            out |= {f"num_edges_{r}": int(e.shape[1]) // 2 for r, e in self.relations.items()}
        return out


class GraphSource(NamedTuple):
    format: str
    relpath: str | None  # default path under the data root


GRAPH_DATASETS: dict[str, GraphSource] = {
    "amazon_upu": GraphSource("mat_network", "amazon_upu_tam/Amazon.mat"),
    "facebook": GraphSource("mat_network", "facebook_gad/Facebook.mat"),
    "tolokers": GraphSource("npz", "tolokers/tolokers.npz"),
    **{n: GraphSource("pygod", f"pygod/{n}.pt.zip") for n in ("reddit", "disney", "books", "enron", "inj_cora",
                                                              "inj_amazon")},
    "yelpchi": GraphSource("care_gnn_yelpchi", "care_gnn/YelpChi.mat"),
    "amazon": GraphSource("care_gnn_amazon", "care_gnn/Amazon.mat"),
    "tfinance": GraphSource("dgl", "tfinance/tfinance"),
    "tsocial": GraphSource("dgl", "tsocial/tsocial"),
    "synthetic": GraphSource("synthetic", None),
}

CARE_GNN_RELATIONS = {"care_gnn_yelpchi": ("net_rur", "net_rtr", "net_rsr"),
                      "care_gnn_amazon": ("net_upu", "net_usu", "net_uvu")}
AMAZON_UNLABELLED = 3305  # CARE-GNN Amazon: users 0..3304 carry no label

_LAYOUTS = {
    "mat_network": "MATLAB keys 'Network' (N×N sparse), 'Attributes' (N×F), 'Label' (N×1)",
    "care_gnn_yelpchi": "CARE-GNN MATLAB keys 'features', 'label', 'net_rur', 'net_rtr', 'net_rsr' ('homo' unused)",
    "care_gnn_amazon": "CARE-GNN MATLAB keys 'features', 'label', 'net_upu', 'net_usu', 'net_uvu' ('homo' unused)",
    "npz": NPZ_LAYOUT,
    "pygod": PYGOD_LAYOUT,
    "dgl": "a DGL binary graph (dgl.save_graphs) with ndata 'feature' and 'label', or its .npz from convert_dgl_to_npz",
}
_OBTAIN = {
    "mat_network": "shipped in shared/data (README §1.2/§1.3; from the ljie-07/DGAD repository, dataset/*.mat)",
    "npz": "shipped in shared/data (README §1.4; yandex-research/heterophilous-graphs, data/tolokers.npz)",
    "pygod": "shipped in shared/data (README §1.1; the pygod-team/data repository, <name>.pt.zip)",
    "care_gnn_yelpchi": "not shipped: unzip YelpChi.mat from the CARE-GNN repository (YingtongDou/CARE-GNN, data/)",
    "care_gnn_amazon": "not shipped: unzip Amazon.mat from the CARE-GNN repository (YingtongDou/CARE-GNN, data/)",
    "dgl": "not shipped: download the BWGNN/GADBench T-Finance or T-Social DGL graph (see the BWGNN README)",
}


def load_graph_dataset(name: str, path: str | Path | None = None, *, root: str | Path | None = None,
                       **synthetic_kw: object) -> GraphData:
    """Load dataset ``name`` from ``path`` (a file), or from its default relative path under ``root``.

    ``synthetic`` takes the ``SyntheticGraphConfig`` fields as keywords. For ``tfinance``/``tsocial`` a ``.npz``
    path (written by ``convert_dgl_to_npz``) is read with the npz reader, so dgl is only needed once.
    """
    if name not in GRAPH_DATASETS:
        raise DatasetError(f"unknown graph dataset {name!r}; known: {sorted(GRAPH_DATASETS)}")
    fmt, relpath = GRAPH_DATASETS[name]
    if fmt == "synthetic":
        if path is not None or root is not None:
            raise DatasetError("the synthetic graph is generated, it takes no path or root (task.path/--path, "
                               f"task.root/--root); to read a file name its dataset, one of {sorted(GRAPH_DATASETS)}")
        return synthetic_graph(**synthetic_kw)
    if synthetic_kw:
        raise DatasetError(f"keyword arguments {sorted(synthetic_kw)} only apply to the 'synthetic' dataset")
    if path is not None and root is not None:
        raise DatasetError("give either path (a file) or root (a data root), not both")
    assert relpath is not None
    file = resolve_data_path(path) if path is not None else (resolve_data_path(root) or data_root()) / relpath
    assert file is not None
    if not file.is_file():
        raise DatasetError(f"graph dataset {name!r}: no file at {file}; expected {_LAYOUTS[fmt]}. "
                           f"How to get it: {_OBTAIN[fmt]}. Pass path=..., root=... or set ETBENCH_DATA.")
    if fmt == "dgl" and file.suffix == ".npz":
        fmt = "npz"
    raw = _read(fmt, file)
    return graph_from_raw(raw, name=name, checksum=file_sha256(file))


def _read(fmt: str, file: Path) -> RawGraph:
    if fmt == "mat_network":
        return read_mat_network(file)
    if fmt in CARE_GNN_RELATIONS:
        return read_care_gnn_mat(file, CARE_GNN_RELATIONS[fmt], AMAZON_UNLABELLED if fmt == "care_gnn_amazon" else 0)
    if fmt == "npz":
        return read_gad_npz(file)
    if fmt == "pygod":
        return read_pygod_zip(file)
    if fmt == "dgl":
        return read_dgl_graph(file)
    raise AssertionError(f"unhandled graph format {fmt!r}")


def synthetic_graph(**params: object) -> GraphData:
    """The seeded SBM graph with BOND-style injected anomalies; checksum = sha256 of its resolved parameters."""
    try:
        cfg = SyntheticGraphConfig(**params)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError(f"bad synthetic graph parameters {sorted(params)} ({e}); allowed: "
                         f"{sorted(SyntheticGraphConfig.__dataclass_fields__)}") from e
    digest = hashlib.sha256(canonical_json({"generator": "sbm_bond_v1", **asdict(cfg)}).encode()).hexdigest()
    name = f"synthetic_sbm_n{cfg.num_nodes}_seed{cfg.seed}"
    return graph_from_raw(generate_synthetic_graph(cfg), name=name, checksum=digest, synthetic=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def undirected_edge_index(edges: np.ndarray | torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Both directions of every edge, duplicates and self-loops removed, sorted by (source, target)."""
    e = torch.as_tensor(edges, dtype=torch.int64)
    e = e[:, e[0] != e[1]]
    key = torch.cat([e[0] * num_nodes + e[1], e[1] * num_nodes + e[0]]).unique()  # unique() also sorts
    return torch.stack([key // num_nodes, key % num_nodes])


def graph_from_raw(raw: RawGraph, *, name: str, checksum: str, synthetic: bool = False) -> GraphData:
    """Validate a raw graph and clean its edges into the ``GraphData`` conventions."""
    n = raw.x.shape[0]
    if raw.x.ndim != 2 or not np.isfinite(raw.x).all():
        raise DatasetError(f"{name}: node features must be a finite (N, F) matrix, got shape {raw.x.shape}")
    if raw.y.shape != (n,) or not np.isin(raw.y, (-1, 0, 1)).all():
        raise DatasetError(f"{name}: labels must be (N,) = ({n},) with values in {{-1, 0, 1}}, got shape "
                           f"{raw.y.shape} values {np.unique(raw.y)[:10].tolist()}")
    if not raw.edges:
        raise DatasetError(f"{name}: the graph has no edge list")
    for rel, e in raw.edges.items():
        if e.size and (e.min() < 0 or e.max() >= n):
            raise DatasetError(f"{name}: relation {rel!r} has node ids in [{e.min()}, {e.max()}], outside [0, {n})")
    relations = {rel: undirected_edge_index(e, n) for rel, e in raw.edges.items()}
    if len(relations) == 1:
        edge_index = next(iter(relations.values()))
    else:
        edge_index = undirected_edge_index(torch.cat(list(relations.values()), dim=1), n)
    splits = None if raw.splits is None else {s: torch.as_tensor(m, dtype=torch.bool) for s, m in raw.splits.items()}
    if splits is not None and len({tuple(m.shape) for m in splits.values()}) != 1:
        raise DatasetError(f"{name}: train/val/test masks differ in shape {[tuple(m.shape) for m in splits.values()]}")
    kind = None if raw.anomaly_type is None else torch.as_tensor(raw.anomaly_type, dtype=torch.int64)
    x, y = torch.as_tensor(raw.x, dtype=torch.float32), torch.as_tensor(raw.y, dtype=torch.int64)
    return GraphData(name=name, x=x, y=y, edge_index=edge_index, relations=relations, splits=splits, checksum=checksum,
                     synthetic=synthetic, anomaly_type=kind)


def save_graph_npz(graph: GraphData, path: str | Path) -> Path:
    """Write ``graph`` in the GADBench/heterophilous npz layout (each undirected edge once); ``load`` reads it back."""
    def once(e: torch.Tensor) -> np.ndarray:
        return e[:, e[0] < e[1]].numpy()

    raw = RawGraph(
        x=graph.x.numpy(), y=graph.y.numpy(), edges={r: once(e) for r, e in graph.relations.items()},
        splits=None if graph.splits is None else {s: m.numpy() for s, m in graph.splits.items()},
        anomaly_type=None if graph.anomaly_type is None else graph.anomaly_type.numpy(),
    )
    path = Path(path)
    write_gad_npz(path, raw)
    return path


def convert_dgl_to_npz(src: str | Path, dst: str | Path) -> Path:
    """Convert a DGL binary graph (T-Finance, T-Social) once into the npz layout (needs the optional dgl)."""
    src = Path(src)
    if not src.is_file():
        raise DatasetError(f"no DGL graph file at {src}; expected {_LAYOUTS['dgl']}")
    graph = graph_from_raw(read_dgl_graph(src), name=src.stem, checksum=file_sha256(src))
    return save_graph_npz(graph, dst)
