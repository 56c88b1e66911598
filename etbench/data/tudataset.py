"""Graph classification datasets (SPEC §5): TU benchmark sets as lists of torch_geometric ``Data``.

Each graph is one ``Data`` with ``x`` (n, F) float32, ``edge_index`` (2, e) int64 local to the graph (undirected,
both directions as the file stores them; exact duplicate rows dropped), ``edge_attr`` (e, K) one-hot edge labels
where the file has them, ``y`` (1,) int64 in 0..C-1 (sorted stored labels: MUTAG's -1/1 become 0/1) and
``num_nodes``. Node features: the node attributes where present, then the one-hot node labels (categories = the
sorted distinct labels of the whole set, as PyG's ``TUDataset`` with ``use_node_attr=True`` orders them); a set with
neither (IMDB-BINARY) gets the one-hot node degree, capped at ``DEGREE_CAP``. The checksum is the sha256 of the zip
(of name, size and bytes of every file, for a directory), as for the other datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch_geometric.data import Data

from etbench.data import DatasetError
from etbench.data.graphs import file_sha256
from etbench.data.image_formats import files_sha256
from etbench.data.paths import data_root, resolve_data_path
from etbench.data.tu_formats import DGCNN_LAYOUT, TU_LAYOUT, RawGraphSet, TextSource, read_dgcnn, read_tu, tu_name

# One-hot degree for sets without node labels or attributes: degrees 0..DEGREE_CAP, larger degrees share the last
# column. 135 is IMDB-BINARY's largest degree, so no IMDB-BINARY node is clipped (the OneHotDegree(135) of GIN
# and Errica et al. style evaluations).
DEGREE_CAP = 135


class TUSource(NamedTuple):
    format: str  # "tu" or "dgcnn"
    file_name: str  # NAME in the file names (NAME_A.txt, NAME.txt)
    relpath: str  # default path under the data root


TU_DATASETS: dict[str, TUSource] = {
    "mutag": TUSource("tu", "MUTAG", "tudataset/MUTAG.zip"),
    "proteins": TUSource("tu", "PROTEINS", "tudataset/PROTEINS.zip"),
    "nci1": TUSource("tu", "NCI1", "tudataset/NCI1.zip"),
    "nci109": TUSource("tu", "NCI109", "tudataset/NCI109.zip"),
    "enzymes": TUSource("tu", "ENZYMES", "tudataset/ENZYMES.zip"),
    "imdb-binary": TUSource("tu", "IMDB-BINARY", "tudataset/IMDB-BINARY.zip"),
    "mutagenicity": TUSource("tu", "Mutagenicity", "tudataset/Mutagenicity.zip"),
    "dd": TUSource("dgcnn", "DD", "tudataset/DD_dgcnn_format.zip"),
}
_OBTAIN = ("shipped in shared/data (README §2: tudataset/<NAME>.zip, the official TU Dortmund archives; DD as "
           "tudataset/DD_dgcnn_format.zip); other copies from https://chrsmrrs.github.io/datasets/")


@dataclass(frozen=True)
class TUDatasetInfo:
    """What a graph classification set holds; flat enough to log as run parameters (``summary``)."""

    name: str
    num_graphs: int
    num_classes: int
    num_node_features: int
    checksum: str
    num_nodes: int
    num_edges: int  # undirected (each stored in both directions)
    class_counts: tuple[int, ...]  # graphs per class 0..C-1
    label_values: tuple[int, ...]  # the stored label of class c
    node_features: str  # how x was built, e.g. "attributes(1)+node_labels_onehot(3)"
    num_edge_features: int  # one-hot edge label width, 0 when the set has no edge labels

    def summary(self) -> dict[str, int | str]:
        return {"name": self.name, "num_graphs": self.num_graphs, "num_classes": self.num_classes,
                "num_node_features": self.num_node_features, "num_nodes": self.num_nodes,
                "num_edges": self.num_edges, "class_counts": ",".join(map(str, self.class_counts)),
                "node_features": self.node_features, "num_edge_features": self.num_edge_features,
                "checksum": self.checksum}


@dataclass
class GraphClsDataset:
    """The graphs, their description and, where the source ships them, its fold indices (DD)."""

    info: TUDatasetInfo
    graphs: list[Data]
    stored_folds: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # (train, test) 0-based graph indices

    @property
    def y(self) -> np.ndarray:
        """(G,) int64 class per graph, for fold construction."""
        return np.array([int(g.y) for g in self.graphs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.graphs)


def load_tu_dataset(name: str, path: str | Path | None = None, *, root: str | Path | None = None,
                    node_attributes: bool = True) -> GraphClsDataset:
    """Load ``name`` (lower case, one of ``TU_DATASETS``) from ``path`` (a zip or directory) or from its default
    relative path under ``root`` (default ``$ETBENCH_DATA``). ``node_attributes=False`` leaves the continuous node
    attributes out of ``x`` (PROTEINS, ENZYMES), keeping the one-hot node labels only."""
    if name not in TU_DATASETS:
        raise DatasetError(f"unknown graph classification dataset {name!r}; known: {sorted(TU_DATASETS)}")
    if path is not None and root is not None:
        raise DatasetError("give either path (a zip or directory) or root (a data root), not both")
    fmt, file_name, relpath = TU_DATASETS[name]
    file = resolve_data_path(path) if path is not None else (resolve_data_path(root) or data_root()) / relpath
    assert file is not None
    layout = TU_LAYOUT if fmt == "tu" else DGCNN_LAYOUT
    if not file.exists():
        raise DatasetError(f"graph classification dataset {name!r}: nothing at {file}; expected {layout}. "
                           f"How to get it: {_OBTAIN}. Pass path=..., root=... or set ETBENCH_DATA.")
    source = TextSource(file)
    try:
        if fmt == "tu":
            raw = read_tu(source, file_name if path is None else tu_name(source))
        else:
            raw = read_dgcnn(source, file_name)
    finally:
        source.close()
    checksum = files_sha256(sorted(p for p in file.rglob("*") if p.is_file())) if file.is_dir() else file_sha256(file)
    return graphs_from_raw(raw, name=name, checksum=checksum, where=str(file), node_attributes=node_attributes)


def _one_hot(values: np.ndarray) -> tuple[np.ndarray, int]:
    cats, idx = np.unique(values, return_inverse=True)
    out = np.zeros((values.size, cats.size), np.float32)
    out[np.arange(values.size), idx] = 1.0
    return out, int(cats.size)


def _dedup_and_check_symmetric(raw: RawGraphSet, where: str) -> np.ndarray:
    """Indices of the first occurrence of every stored (row, col), in file order; refuses one-directional edges."""
    n = raw.graph_of_node.size
    key = raw.edges[0] * n + raw.edges[1]
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    key = key[keep]
    ordered = np.sort(key)
    reverse = raw.edges[1, keep] * n + raw.edges[0, keep]
    missing = ordered[np.minimum(np.searchsorted(ordered, reverse), ordered.size - 1)] != reverse
    if missing.any():
        u, v = raw.edges[:, keep[np.flatnonzero(missing)[0]]]
        g = raw.graph_of_node[u]
        raise DatasetError(f"{where}: edge ({u + 1}, {v + 1}) (graph {g + 1}) is stored in one direction only "
                           f"({int(missing.sum())} such rows); expected both directions of every undirected edge")
    return keep


def _node_features(raw: RawGraphSet, edges: np.ndarray, node_attributes: bool) -> tuple[np.ndarray, str]:
    parts, names = [], []
    if node_attributes and raw.node_attributes is not None:
        parts.append(raw.node_attributes.astype(np.float32))
        names.append(f"attributes({raw.node_attributes.shape[1]})")
    if raw.node_labels is not None:
        onehot, k = _one_hot(raw.node_labels)
        parts.append(onehot)
        names.append(f"node_labels_onehot({k})")
    if not parts:
        n = raw.graph_of_node.size
        degree = np.minimum(np.bincount(edges[0], minlength=n), DEGREE_CAP)
        x = np.zeros((n, DEGREE_CAP + 1), np.float32)
        x[np.arange(n), degree] = 1.0
        return x, f"degree_onehot(cap {DEGREE_CAP})"
    return np.concatenate(parts, axis=1), "+".join(names)


def graphs_from_raw(raw: RawGraphSet, *, name: str, checksum: str, where: str,
                    node_attributes: bool = True) -> GraphClsDataset:
    """Split a ``RawGraphSet`` into one ``Data`` per graph (see the module docstring for the conventions)."""
    keep = _dedup_and_check_symmetric(raw, where)
    edges = raw.edges[:, keep]
    x, described = _node_features(raw, edges, node_attributes)
    label_values, y = np.unique(raw.graph_labels, return_inverse=True)
    edge_attr = None
    if raw.edge_labels is not None:
        edge_attr = torch.from_numpy(_one_hot(raw.edge_labels[keep])[0])
    num_graphs = raw.graph_labels.size
    node_ptr = np.concatenate([[0], np.cumsum(np.bincount(raw.graph_of_node, minlength=num_graphs))])
    edge_graph = raw.graph_of_node[edges[0]]
    order = np.argsort(edge_graph, kind="stable")  # group edges by graph, file order within a graph
    edge_ptr = np.concatenate([[0], np.cumsum(np.bincount(edge_graph, minlength=num_graphs))])
    x_t, e_t = torch.from_numpy(x), torch.from_numpy(edges[:, order])
    a_t = None if edge_attr is None else edge_attr[torch.from_numpy(order)]
    graphs = []
    for g in range(num_graphs):
        n0, n1, e0, e1 = (int(v) for v in (node_ptr[g], node_ptr[g + 1], edge_ptr[g], edge_ptr[g + 1]))
        data = Data(x=x_t[n0:n1], edge_index=e_t[:, e0:e1] - n0, y=torch.tensor([int(y[g])]), num_nodes=n1 - n0)
        if a_t is not None:
            data.edge_attr = a_t[e0:e1]
        graphs.append(data)
    info = TUDatasetInfo(
        name=name, num_graphs=num_graphs, num_classes=int(label_values.size), num_node_features=int(x.shape[1]),
        checksum=checksum, num_nodes=int(raw.graph_of_node.size), num_edges=int(edges.shape[1]) // 2,
        class_counts=tuple(int(c) for c in np.bincount(y, minlength=label_values.size)),
        label_values=tuple(int(v) for v in label_values), node_features=described,
        num_edge_features=0 if edge_attr is None else int(edge_attr.shape[1]))
    return GraphClsDataset(info=info, graphs=graphs, stored_folds=raw.stored_folds)
