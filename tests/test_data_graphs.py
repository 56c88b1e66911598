"""Graph anomaly detection datasets: shipped files, CARE-GNN/npz/PyGOD/DGL formats, safety, synthetic generator."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from etbench.data import DatasetError
from etbench.data.graph_formats import _rebuild_tensor
from etbench.data.graphs import (
    AMAZON_UNLABELLED,
    GRAPH_DATASETS,
    GraphData,
    convert_dgl_to_npz,
    load_graph_dataset,
    save_graph_npz,
)


def _shipped(root: Path, name: str) -> Path:
    path = root / GRAPH_DATASETS[name].relpath
    if not path.is_file():
        pytest.skip(f"shipped data file not found: {path}")
    return path


def _edge_set(e: torch.Tensor) -> set[tuple[int, int]]:
    return set(zip(e[0].tolist(), e[1].tolist(), strict=True))


def _assert_clean(e: torch.Tensor, n: int) -> None:
    """Symmetric, no self-loops, no duplicates, ids in range."""
    assert e.dtype == torch.int64 and e.shape[0] == 2
    assert int(e.min()) >= 0 and int(e.max()) < n
    assert not bool((e[0] == e[1]).any())
    key, rev = e[0] * n + e[1], e[1] * n + e[0]
    assert key.unique().numel() == key.numel()
    assert torch.equal(key.sort().values, rev.sort().values)


# Oracle: shared/data/README.md. Undirected edge counts: the README's (Amazon-UPU, Facebook: nnz/2; Tolokers, disney,
# books, enron: stored once), reddit (168016 - 10984 self-loops) / 2, and for inj_cora / inj_amazon (whose injected
# edges are not all stored both ways) the count scipy gives for (A + Aᵀ > 0) minus the diagonal on the edge_index
# that torch.load + torch_geometric returns.
SHIPPED = [  # name, nodes, features, undirected edges, anomalies, sha256 prefix
    ("facebook", 1081, 576, 27552, 25, "320e6ced0e68"),
    ("amazon_upu", 10224, 25, 175608, 693, "e36e1714864c"),
    ("tolokers", 11758, 10, 519000, 2566, "dacf3ac94cec"),
    ("disney", 124, 28, 335, 6, "761d111a6ec9"),
    ("books", 1418, 21, 3695, 28, "c9de331ddf4c"),
    ("enron", 13533, 18, 176987, 5, "ac9f74f9a0ff"),
    ("reddit", 10984, 64, 78516, 366, "276432d36219"),
    ("inj_cora", 2708, 1433, 5574, 138, "4dfaa72e7b32"),
    ("inj_amazon", 13752, 767, 257435, 694, "8b458d9bbcad"),
]


@pytest.mark.parametrize(("name", "nodes", "feats", "edges", "anomalies", "sha"), SHIPPED)
def test_shipped_graph_counts(shared_data, name, nodes, feats, edges, anomalies, sha):
    g = load_graph_dataset(name, _shipped(shared_data, name))
    assert (g.num_nodes, g.num_features, g.num_edges, g.num_anomalies) == (nodes, feats, edges, anomalies)
    assert g.x.dtype == torch.float32 and g.y.dtype == torch.int64 and set(g.y.unique().tolist()) == {0, 1}
    assert g.checksum.startswith(sha) and len(g.checksum) == 64 and not g.synthetic
    assert list(g.relations) == ["homo"] and g.relations["homo"] is g.edge_index
    _assert_clean(g.edge_index, nodes)
    s = g.summary()
    assert (s["num_edges"], s["num_labelled"], s["name"]) == (edges, nodes, name)


def test_default_root_and_injected_bit_field(shared_data, monkeypatch):
    _shipped(shared_data, "inj_cora")
    monkeypatch.setenv("ETBENCH_DATA", str(shared_data))
    g = load_graph_dataset("inj_cora")
    assert g.anomaly_type is not None and set(g.anomaly_type.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(g.y, (g.anomaly_type > 0).long())
    assert g.splits is None  # its masks are Cora's class-label splits (140/500/1000), not anomaly splits


def test_tolokers_stored_splits(shared_data):
    g = load_graph_dataset("tolokers", root=shared_data)
    assert g.splits is not None
    tr, va, te = (g.splits[k] for k in ("train", "val", "test"))
    assert tr.shape == va.shape == te.shape == (10, 11758) and tr.dtype == torch.bool
    assert tr.sum(1).tolist() == [5879] * 10 and va.sum(1).tolist() == [2939] * 10 and te.sum(1).tolist() == [2940] * 10
    assert bool(((tr.int() + va.int() + te.int()) == 1).all())  # disjoint and covering, per split
    assert g.summary()["num_splits"] == 10


# --------------------------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def _write_pt_zip(path: Path, pkl: bytes) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(path.name.removesuffix(".zip"), inner.getvalue())
    return path


@pytest.mark.parametrize("call", [os.system, eval])
def test_malicious_pickle_is_refused_without_running(tmp_path, call):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w')"
    path = _write_pt_zip(tmp_path / "evil.pt.zip", pickle.dumps({"x": _Evil(call, arg)}, protocol=2))
    with pytest.raises(DatasetError, match="refused") as err:
        load_graph_dataset("disney", path)
    assert call.__name__ in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_tensor_rebuild_is_bounds_checked():
    storage = np.arange(6, dtype=np.int64)
    assert _rebuild_tensor(storage, 1, (2, 2), (2, 1)).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(pickle.UnpicklingError, match="overruns"):
        _rebuild_tensor(storage, 2, (2, 3), (3, 1))  # would read past the 6 stored values
    with pytest.raises(pickle.UnpicklingError, match="malformed"):
        _rebuild_tensor(storage, 0, (2,), (-1,))


def test_corrupt_pygod_archive(tmp_path):
    bad = tmp_path / "books.pt.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match=str(bad)):
        load_graph_dataset("books", bad)


# --------------------------------------------------------------------------------------------- CARE-GNN .mat


def _adj(n: int, pairs: list[tuple[int, int]]) -> sp.csc_matrix:
    r, c = zip(*pairs, strict=True)
    return sp.csc_matrix((np.ones(len(pairs)), (r, c)), shape=(n, n))


def _und(pairs: list[tuple[int, int]]) -> set[tuple[int, int]]:
    return {p for a, b in pairs if a != b for p in ((a, b), (b, a))}


def test_care_gnn_yelpchi_layout(tmp_path):
    n = 8
    rels = {"net_rur": [(0, 1), (1, 0), (2, 3)], "net_rtr": [(0, 1), (4, 5), (6, 6)], "net_rsr": [(7, 2), (3, 2)]}
    label = np.array([[0, 1, 0, 0, 1, 0, 0, 1]])
    feats = sp.random(n, 4, density=0.5, format="csc", random_state=0)
    (tmp_path / "care_gnn").mkdir()
    scipy.io.savemat(tmp_path / "care_gnn" / "YelpChi.mat", {
        "homo": _adj(n, [(0, 1)]),  # deliberately not the union: the loader must not trust it
        "features": feats, "label": label, **{k: _adj(n, v) for k, v in rels.items()}})
    g = load_graph_dataset("yelpchi", root=tmp_path)
    assert set(g.relations) == {"rur", "rtr", "rsr"}
    for key, pairs in rels.items():
        assert _edge_set(g.relations[key.removeprefix("net_")]) == _und(pairs)
        _assert_clean(g.relations[key.removeprefix("net_")], n)
    union = _und([p for v in rels.values() for p in v])
    assert _edge_set(g.edge_index) == union and g.num_edges == 4  # 0-1, 2-3, 4-5, 2-7
    assert g.y.tolist() == label.ravel().tolist() and np.allclose(g.x.numpy(), feats.toarray())
    assert g.summary()["num_edges_rtr"] == 2


def test_care_gnn_amazon_unlabelled_prefix(tmp_path):
    n = AMAZON_UNLABELLED + 5
    label = np.zeros((1, n), np.int64)
    label[0, [10, n - 1, n - 3]] = 1
    rels = {"net_upu": [(0, n - 1)], "net_usu": [(n - 1, 0), (1, 2)], "net_uvu": [(3, 4)]}
    path = tmp_path / "Amazon.mat"
    scipy.io.savemat(path, {"homo": _adj(n, [(0, 1)]), "features": sp.eye(n, 3, format="csc"), "label": label,
                            **{k: _adj(n, v) for k, v in rels.items()}})
    g = load_graph_dataset("amazon", path)
    assert set(g.relations) == {"upu", "usu", "uvu"} and g.num_edges == 3
    assert (g.y[:AMAZON_UNLABELLED] == -1).all() and g.y[AMAZON_UNLABELLED:].tolist() == [0, 0, 1, 0, 1]
    assert int(g.labelled_mask.sum()) == 5 and g.num_anomalies == 2 and g.summary()["anomaly_rate"] == 0.4


def test_care_gnn_missing_relation_names_key_and_path(tmp_path):
    path = tmp_path / "YelpChi.mat"
    scipy.io.savemat(path, {"features": sp.eye(4, 2, format="csc"), "label": np.zeros((1, 4)),
                            "net_rur": _adj(4, [(0, 1)]), "net_rtr": _adj(4, [(1, 2)])})
    with pytest.raises(DatasetError, match="net_rsr") as err:
        load_graph_dataset("yelpchi", path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------- errors, npz, DGL


def test_missing_file_names_path_layout_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("ETBENCH_DATA", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        load_graph_dataset("facebook")
    msg = str(err.value)
    assert str(tmp_path / "facebook_gad" / "Facebook.mat") in msg and "'Network'" in msg and "How to get it" in msg
    with pytest.raises(DatasetError, match="unknown graph dataset 'cora'"):
        load_graph_dataset("cora")


def test_missing_mat_and_npz_keys(tmp_path):
    mat = tmp_path / "Facebook.mat"
    scipy.io.savemat(mat, {"Network": _adj(3, [(0, 1)]), "Attributes": np.ones((3, 2))})
    with pytest.raises(DatasetError, match="Label") as err:
        load_graph_dataset("facebook", mat)
    assert str(mat) in str(err.value)
    npz = tmp_path / "t.npz"
    np.savez(npz, node_features=np.ones((3, 2), np.float32), edges=np.array([[0, 1]]))
    with pytest.raises(DatasetError, match="node_labels") as err:
        load_graph_dataset("tolokers", npz)
    assert str(npz) in str(err.value)


def test_bad_labels_and_edge_ids_are_named(tmp_path):
    npz = tmp_path / "t.npz"
    feats = np.ones((3, 2), np.float32)
    np.savez(npz, node_features=feats, node_labels=np.array([0, 2, 1]), edges=np.array([[0, 1]]))
    with pytest.raises(DatasetError, match=r"labels must be .* values \[0, 1, 2\]"):
        load_graph_dataset("tolokers", npz)
    np.savez(npz, node_features=feats, node_labels=np.array([0.0, 0.5, 1.0]), edges=np.array([[0, 1]]))
    with pytest.raises(DatasetError, match="integer labels"):
        load_graph_dataset("tolokers", npz)
    np.savez(npz, node_features=feats, node_labels=np.array([0, 0, 1]), edges=np.array([[0, 3]]))
    with pytest.raises(DatasetError, match=r"node ids in \[0, 3\], outside \[0, 3\)"):
        load_graph_dataset("tolokers", npz)


def test_npz_round_trip_keeps_everything(tmp_path, shared_data):
    g = load_graph_dataset("synthetic", num_nodes=300, seed=3)
    g.y[:7] = -1  # unlabelled nodes survive the round trip too
    path = save_graph_npz(g, tmp_path / "synthetic.npz")
    back = load_graph_dataset("tfinance", path)  # the DGL datasets read their converted .npz
    for field in ("x", "y", "edge_index", "anomaly_type"):
        assert torch.equal(getattr(back, field), getattr(g, field)), field
    assert back.splits is None and list(back.relations) == ["homo"]
    with np.load(path) as z:  # each undirected edge stored once, as the heterophilous-graphs layout does
        assert z["edges"].shape == (g.num_edges, 2) and bool((z["edges"][:, 0] < z["edges"][:, 1]).all())

    tol = load_graph_dataset("tolokers", _shipped(shared_data, "tolokers"))
    back = load_graph_dataset("tolokers", save_graph_npz(tol, tmp_path / "tol.npz"))
    assert torch.equal(back.edge_index, tol.edge_index) and torch.equal(back.y, tol.y)
    assert all(torch.equal(back.splits[k], tol.splits[k]) for k in ("train", "val", "test"))


def test_npz_round_trip_multi_relation(tmp_path):
    n = 6
    rels = {"net_rur": [(0, 1)], "net_rtr": [(1, 2), (0, 1)], "net_rsr": [(4, 5)]}
    scipy.io.savemat(tmp_path / "y.mat", {"features": sp.eye(n, 2, format="csc"), "label": np.ones((1, n)),
                                          **{k: _adj(n, v) for k, v in rels.items()}})
    g = load_graph_dataset("yelpchi", tmp_path / "y.mat")
    back = load_graph_dataset("tsocial", save_graph_npz(g, tmp_path / "y.npz"))
    assert set(back.relations) == set(g.relations)
    assert all(torch.equal(back.relations[r], g.relations[r]) for r in g.relations)
    assert torch.equal(back.edge_index, g.edge_index) and back.num_edges == 3


@pytest.mark.skipif(importlib.util.find_spec("dgl") is not None, reason="dgl is installed here")
def test_dgl_missing_gives_clear_error(tmp_path):
    src = tmp_path / "tfinance"
    src.write_bytes(b"\x00" * 16)
    with pytest.raises(ImportError, match="optional package 'dgl'") as err:
        convert_dgl_to_npz(src, tmp_path / "tfinance.npz")
    assert "convert_dgl_to_npz" in str(err.value) and str(src) in str(err.value)
    with pytest.raises(ImportError, match="dgl"):
        load_graph_dataset("tfinance", src)


# --------------------------------------------------------------------------------------------- synthetic generator


def test_synthetic_is_deterministic_per_seed():
    a, b = load_graph_dataset("synthetic", seed=1), load_graph_dataset("synthetic", seed=1)
    c = load_graph_dataset("synthetic", seed=2)
    assert isinstance(a, GraphData) and a.synthetic and "synthetic" in a.name
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.y, b.y)
    assert a.checksum == b.checksum != c.checksum
    assert not torch.equal(a.x, c.x)
    assert (a.num_nodes, a.num_features) == (1000, 16)
    assert 4500 < a.num_edges < 5600  # ≈ 1000 · avg_degree 10 / 2 SBM edges + 3 · 45 clique edges
    _assert_clean(a.edge_index, a.num_nodes)


def test_synthetic_anomaly_counts_and_recipe():
    g = load_graph_dataset("synthetic", num_nodes=400, clique_size=6, num_cliques=4, num_contextual=11, seed=5)
    assert g.num_anomalies == 6 * 4 + 11
    assert torch.bincount(g.anomaly_type, minlength=3).tolist() == [400 - 35, 11, 24]
    x = g.x
    for i in torch.nonzero(g.anomaly_type == 1).ravel().tolist():  # contextual: a copy of another node's features
        same = (x == x[i]).all(1)
        same[i] = False
        assert bool(same.any())

    # With no SBM edges, the only edges are the injected cliques: 4 disjoint complete graphs on 6 nodes.
    s = load_graph_dataset("synthetic", num_nodes=400, avg_degree=0.0, clique_size=6, num_cliques=4, seed=5)
    assert s.num_edges == 4 * 15
    nodes = s.edge_index.unique()
    assert torch.equal(nodes, torch.nonzero(s.anomaly_type == 2).ravel())
    closed = torch.zeros(400, 400, dtype=torch.bool)
    closed[s.edge_index[0], s.edge_index[1]] = True
    closed |= torch.eye(400, dtype=torch.bool)
    for v in nodes.tolist():  # every member of v's clique has exactly the same closed neighbourhood of 6 nodes
        members = torch.nonzero(closed[v]).ravel()
        assert members.numel() == 6 and bool((closed[members] == closed[v]).all())


def test_synthetic_bad_parameters():
    with pytest.raises(ValueError, match="num_nodes"):
        load_graph_dataset("synthetic", num_nodes=20, clique_size=10, num_cliques=2, num_contextual=5)
    with pytest.raises(ValueError, match="allowed"):
        load_graph_dataset("synthetic", n_nodes=10)
    with pytest.raises(ValueError, match="only apply"):
        load_graph_dataset("facebook", seed=1)
