"""Graph classification data (SPEC §5): TU and DGCNN loaders against counts made here with plain Python from the raw
text, clear errors on corrupt files, and the cv10 / authors / stored folds (stratified, disjoint, covering)."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_file
from torch_geometric.data import Batch

from etbench.data import DatasetError
from etbench.data.tudataset import DEGREE_CAP, TU_DATASETS, GraphClsDataset, load_tu_dataset
from etbench.tasks.graphcls_folds import GraphFold, authors, cv10, inner_holdout, make_folds, stored

# shared/data/README.md §2: graphs, nodes, A.txt rows, undirected edges, graph label -> count, sha256 prefix
README = {
    "mutag": (188, 3371, 7442, 3721, {-1: 63, 1: 125}, "20f52db8"),
    "proteins": (1113, 43471, 162088, 81044, {1: 663, 2: 450}, "fe9d1974"),
    "nci1": (4110, 122747, 265506, 132753, {0: 2053, 1: 2057}, "eae6b0c0"),
    "enzymes": (600, 19580, 74564, 37282, {k: 100 for k in range(1, 7)}, "0ca7125d"),
    "imdb-binary": (1000, 19773, 386124, 96531, {0: 500, 1: 500}, "2a4abb64"),
    "mutagenicity": (4337, 131488, 266894, 133447, {0: 2401, 1: 1936}, "eedcb94a"),
    "nci109": (4127, 122494, 265208, 132604, {0: 2048, 1: 2079}, "c9e5388b"),
}
TU_NAMES = sorted(README)
_CACHE: dict[str, GraphClsDataset] = {}


def _load(shared_data: Path, name: str) -> GraphClsDataset:
    require_file(shared_data / TU_DATASETS[name].relpath)
    if name not in _CACHE:
        _CACHE[name] = load_tu_dataset(name, root=shared_data)
    return _CACHE[name]


def _members(zip_path: Path) -> dict[str, list[str]]:
    """Base name -> non-empty lines, read with zipfile and str only."""
    with zipfile.ZipFile(zip_path) as z:
        return {m.rsplit("/", 1)[-1]: [ln for ln in z.read(m).decode().splitlines() if ln.strip()]
                for m in z.namelist() if m.endswith(".txt")}


# ------------------------------------------------------------------------------------------------------- TU loaders


@pytest.mark.parametrize("name", TU_NAMES)
def test_tu_loader_matches_counts_made_from_the_raw_text(shared_data: Path, name: str) -> None:
    ds = _load(shared_data, name)
    stem = TU_DATASETS[name].file_name
    files = _members(shared_data / TU_DATASETS[name].relpath)
    labels = [int(s) for s in files[f"{stem}_graph_labels.txt"]]
    indicator = [int(s) for s in files[f"{stem}_graph_indicator.txt"]]
    pairs = [tuple(int(t) for t in s.split(",")) for s in files[f"{stem}_A.txt"]]
    graphs, nodes, rows, undirected, label_counts, sha = README[name]
    # the independent count agrees with the README table ...
    assert (len(labels), len(indicator), len(pairs)) == (graphs, nodes, rows)
    assert len(set(pairs)) == 2 * undirected and Counter(labels) == label_counts
    # ... and so does the loader
    info = ds.info
    assert (info.num_graphs, info.num_nodes, info.num_edges, len(ds)) == (graphs, nodes, undirected, graphs)
    assert info.checksum.startswith(sha) and info.num_classes == len(label_counts)
    assert info.class_counts == tuple(label_counts[k] for k in sorted(label_counts))
    assert info.label_values == tuple(sorted(label_counts))
    assert sum(int(g.edge_index.shape[1]) for g in ds.graphs) == len(set(pairs))
    per_graph = Counter(indicator)
    assert [g.num_nodes for g in ds.graphs] == [per_graph[k] for k in range(1, graphs + 1)]
    assert all(g.x.shape == (g.num_nodes, info.num_node_features) and g.x.dtype == torch.float32 for g in ds.graphs)
    y = ds.y
    assert [int(c) for c in np.bincount(y)] == list(info.class_counts)
    assert [sorted(label_counts).index(v) for v in labels] == y.tolist()


def test_mutag_graph_by_graph(shared_data: Path) -> None:
    """Every MUTAG graph: local edges, one-hot node labels and one-hot edge labels, row by row from the text."""
    ds = _load(shared_data, "mutag")
    f = _members(shared_data / "tudataset/MUTAG.zip")
    indicator = [int(s) for s in f["MUTAG_graph_indicator.txt"]]
    node_label = [int(s) for s in f["MUTAG_node_labels.txt"]]
    edge_label = [int(s) for s in f["MUTAG_edge_labels.txt"]]
    first = {}
    for i, g in enumerate(indicator):
        first.setdefault(g, i)
    node_cats, edge_cats = sorted(set(node_label)), sorted(set(edge_label))
    assert ds.info.num_node_features == 7 and ds.info.num_edge_features == 4 == len(edge_cats)
    expected: dict[int, list[tuple[int, int, int]]] = {}
    for line, lab in zip(f["MUTAG_A.txt"], edge_label, strict=True):
        u, v = (int(t) - 1 for t in line.split(","))
        g = indicator[u]
        expected.setdefault(g, []).append((u - first[g], v - first[g], edge_cats.index(lab)))
    for k, data in enumerate(ds.graphs, start=1):
        got = list(zip(*data.edge_index.tolist(), data.edge_attr.argmax(1).tolist(), strict=True))
        assert got == expected[k]  # file order kept within each graph
        assert data.edge_attr.sum(1).eq(1).all()
        labels = node_label[first[k]:first[k] + data.num_nodes]
        assert data.x.argmax(1).tolist() == [node_cats.index(v) for v in labels]
        assert data.x.sum(1).eq(1).all()
    batch = Batch.from_data_list(ds.graphs[:4])
    assert batch.num_graphs == 4 and batch.y.tolist() == ds.y[:4].tolist()


def test_attributes_come_first_then_node_labels(shared_data: Path) -> None:
    ds = _load(shared_data, "proteins")
    f = _members(shared_data / "tudataset/PROTEINS.zip")
    attrs = [float(s) for s in f["PROTEINS_node_attributes.txt"][:ds.graphs[0].num_nodes]]
    assert ds.info.node_features == "attributes(1)+node_labels_onehot(3)"
    assert ds.graphs[0].x[:, 0].tolist() == pytest.approx(attrs)
    lean = load_tu_dataset("proteins", root=shared_data, node_attributes=False)
    assert lean.info.num_node_features == 3 and torch.equal(lean.graphs[0].x, ds.graphs[0].x[:, 1:])


def test_imdb_binary_gets_capped_degree_one_hot(shared_data: Path) -> None:
    ds = _load(shared_data, "imdb-binary")
    f = _members(shared_data / "tudataset/IMDB-BINARY.zip")
    n0 = ds.graphs[0].num_nodes
    pairs = {tuple(int(t) for t in s.split(",")) for s in f["IMDB-BINARY_A.txt"]}  # rows are listed twice: a set
    degree = Counter(u for u, _ in pairs if u <= n0)
    assert ds.info.num_node_features == DEGREE_CAP + 1 and ds.info.node_features.startswith("degree_onehot")
    assert ds.graphs[0].x.argmax(1).tolist() == [min(degree[i], DEGREE_CAP) for i in range(1, n0 + 1)]
    assert max(int(g.x.argmax(1).max()) for g in ds.graphs) == DEGREE_CAP  # 135 is the largest IMDB-BINARY degree


# ------------------------------------------------------------------------------------------------------ DGCNN / DD


def test_dd_loader_and_its_shipped_folds_match_the_raw_text(shared_data: Path) -> None:
    ds = _load(shared_data, "dd")
    with zipfile.ZipFile(shared_data / TU_DATASETS["dd"].relpath) as z:
        lines = z.read("DD/DD.txt").decode().splitlines()
        fold_text = {m.rsplit("/", 1)[-1]: z.read(m).decode() for m in z.namelist() if "10fold_idx/" in m
                     and m.endswith(".txt") and "__MACOSX" not in m}
    graphs, i, labels, sizes, entries, tags = int(lines[0]), 1, Counter(), [], 0, set()
    for _ in range(graphs):
        n, label = (int(t) for t in lines[i].split())
        labels[label] += 1
        sizes.append(n)
        for row in lines[i + 1:i + 1 + n]:
            parts = row.split()
            tags.add(parts[0])
            entries += int(parts[1])
        i += 1 + n
    assert (graphs, sum(sizes), entries // 2, dict(labels), len(tags)) == (1178, 334925, 843046, {0: 691, 1: 487}, 82)
    info = ds.info
    assert (info.num_graphs, info.num_nodes, info.num_edges, info.num_node_features) == (1178, 334925, 843046, 82)
    assert info.class_counts == (691, 487) and info.checksum.startswith("0ce3eca1")
    assert [g.num_nodes for g in ds.graphs] == sizes
    first = [int(t) for t in lines[2].split()]  # graph 1, node 0: tag, degree, neighbours
    assert ds.graphs[0].edge_index[1, :first[1]].tolist() == first[2:]
    assert ds.stored_folds is not None and len(ds.stored_folds) == 10
    for k, (train, test) in enumerate(ds.stored_folds, start=1):
        assert train.tolist() == [int(t) for t in fold_text[f"train_idx-{k}.txt"].split()]
        assert test.tolist() == [int(t) for t in fold_text[f"test_idx-{k}.txt"].split()]
        assert (train.size, test.size) == (1061, 117)
    tested = np.concatenate([t for _, t in ds.stored_folds])
    assert np.unique(tested).size == tested.size == 1170  # disjoint test folds; 8 graphs never tested
    for fold in stored(ds.y, ds.stored_folds, seed=3):
        train, test = ds.stored_folds[fold.fold]
        assert np.array_equal(np.union1d(fold.train, fold.val), np.sort(train)) and np.array_equal(fold.test,
                                                                                                    np.sort(test))
        _assert_disjoint(fold)


def _write_dgcnn(tmp: Path, text: str) -> Path:
    (tmp / "DD").mkdir(parents=True, exist_ok=True)
    (tmp / "DD" / "DD.txt").write_text(text)
    return tmp


def test_dgcnn_small_file_and_its_errors(tmp_path: Path) -> None:
    good = "2\n3 1\n7 1 1\n8 2 0 2\n7 1 1\n2 0\n9 1 1\n9 1 0\n"
    ds = load_tu_dataset("dd", path=_write_dgcnn(tmp_path / "ok", good))
    assert ds.info.num_graphs == 2 and ds.info.num_edges == 3 and ds.info.class_counts == (1, 1)
    assert ds.graphs[0].edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]] and ds.stored_folds is None
    assert ds.graphs[1].x.argmax(1).tolist() == [2, 2] and int(ds.graphs[0].y) == 1
    cases = {
        "truncated": (good.rsplit("\n", 2)[0] + "\n", r"DD\.txt line 8: the file ends after 1 of the 2 node lines"),
        "bad neighbour": (good.replace("8 2 0 2", "8 2 0 5"), r"DD\.txt line 4: neighbour 5; expected"),
        "short row": (good.replace("8 2 0 2", "8 3 0 2"), r"DD\.txt line 4: tag 8, degree 3 with 2 value"),
        "not a number": (good.replace("9 1 0", "9 1 x"), r"DD\.txt line 8: 'x' is not a number"),
        "one-directional": (good.replace("7 1 1\n2 0", "7 0\n2 0"), r"edge \(2, 3\) \(graph 1\) is stored in one"),
    }
    for case, (text, match) in cases.items():
        with pytest.raises(DatasetError, match=match):
            load_tu_dataset("dd", path=_write_dgcnn(tmp_path / case.replace(" ", "_"), text))


# ------------------------------------------------------------------------------------------------- corrupt TU files


def _write_tu(tmp: Path, **files: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for part, text in files.items():
        (tmp / f"TOY_{part}.txt").write_text(text)
    return tmp


TOY = {"A": "1, 2\n2, 1\n2, 3\n3, 2\n4, 5\n5, 4\n", "graph_indicator": "1\n1\n1\n2\n2\n",
       "graph_labels": "-1\n1\n", "node_labels": "0\n2\n0\n2\n2\n"}


def test_tu_directory_and_its_errors(tmp_path: Path) -> None:
    ds = load_tu_dataset("mutag", path=_write_tu(tmp_path / "ok", **TOY))
    assert [g.num_nodes for g in ds.graphs] == [3, 2] and ds.y.tolist() == [0, 1]
    assert ds.graphs[1].edge_index.tolist() == [[0, 1], [1, 0]] and ds.graphs[0].x.argmax(1).tolist() == [0, 1, 0]
    cases = {
        "A": ("1, 2\n2, 1\n2,\n3, 2\n", r"TOY_A\.txt line 3: '' is not a number"),
        "graph_indicator": ("1\n1\n1\n2\n", r"TOY_A\.txt line 5: node pair \[4, 5\] outside 1\.\.4"),
        "node_labels": ("0\n2\n0\n", r"TOY_node_labels\.txt: 3 lines; expected 5"),
        "graph_labels": ("-1\n1\n\n3\n", r"TOY_graph_labels\.txt line 3: empty line"),
    }
    for part, (text, match) in cases.items():
        with pytest.raises(DatasetError, match=match):
            load_tu_dataset("mutag", path=_write_tu(tmp_path / part, **{**TOY, part: text}))
    with pytest.raises(DatasetError, match=r"TOY_graph_indicator\.txt line 4: graph id 1 after 2"):
        load_tu_dataset("mutag", path=_write_tu(tmp_path / "order", **{**TOY, "graph_indicator": "1\n1\n2\n1\n2\n"}))
    with pytest.raises(DatasetError, match=r"nodes \[3, 4\] lie in different graphs"):
        load_tu_dataset("mutag", path=_write_tu(tmp_path / "cross", **{**TOY, "A": TOY["A"] + "3, 4\n4, 3\n"}))


def test_truncated_real_file_names_file_and_line(shared_data: Path, tmp_path: Path) -> None:
    src = require_file(shared_data / "tudataset/MUTAG.zip")
    with zipfile.ZipFile(src) as z:
        for m in z.namelist():
            if m.endswith(".txt"):
                (tmp_path / m.rsplit("/", 1)[-1]).write_bytes(z.read(m))
    a = (tmp_path / "MUTAG_A.txt").read_text().splitlines()
    (tmp_path / "MUTAG_A.txt").write_text("\n".join(a[:100]) + "\n" + a[100].split(",")[0] + ",")  # cut mid-line
    with pytest.raises(DatasetError, match=r"MUTAG_A\.txt line 101: "):
        load_tu_dataset("mutag", path=tmp_path)
    half = src.read_bytes()[: src.stat().st_size // 2]
    (tmp_path / "half.zip").write_bytes(half)
    with pytest.raises(DatasetError, match=r"half\.zip: not a readable zip archive"):
        load_tu_dataset("mutag", path=tmp_path / "half.zip")
    stored_zip = tmp_path / "crc.zip"
    with zipfile.ZipFile(stored_zip, "w", zipfile.ZIP_STORED) as z:
        for part, text in TOY.items():
            z.writestr(f"TOY//TOY_{part}.txt", text)
    raw = stored_zip.read_bytes()
    at = raw.index(TOY["graph_labels"].encode())
    stored_zip.write_bytes(raw[:at] + b"7" + raw[at + 1:])  # same length, wrong CRC
    with pytest.raises(DatasetError, match=r"crc\.zip:TOY//TOY_graph_labels\.txt: corrupt or truncated"):
        load_tu_dataset("mutag", path=stored_zip)


def test_unknown_or_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown graph classification dataset 'frankenstein'"):
        load_tu_dataset("frankenstein")
    with pytest.raises(DatasetError, match=r"nothing at .*MUTAG\.zip.*How to get it"):
        load_tu_dataset("mutag", root=tmp_path)


# ------------------------------------------------------------------------------------------------------------ folds


def _assert_disjoint(fold: GraphFold) -> None:
    parts = (fold.train, fold.val, fold.test)
    assert all(np.unique(p).size == p.size for p in parts)
    assert not np.intersect1d(fold.train, fold.test).size and not np.intersect1d(fold.val, fold.test).size
    assert not np.intersect1d(fold.train, fold.val).size


def _within_one(counts: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.all(np.abs(counts - expected) <= 1))


@pytest.mark.parametrize("name", ["mutag", "enzymes", "proteins", "nci1"])
def test_cv10_is_stratified_disjoint_and_covering(shared_data: Path, name: str) -> None:
    y = _load(shared_data, name).y
    n_c = np.bincount(y)
    folds = cv10(y, seed=5, repeats=2)
    assert len(folds) == 20 and {f.repeat for f in folds} == {0, 1} and {f.seed for f in folds} == {5, 6}
    for r in (0, 1):
        mine = [f for f in folds if f.repeat == r]
        tests = np.concatenate([f.test for f in mine])
        assert np.array_equal(np.sort(tests), np.arange(y.size))  # disjoint and covering
        for f in mine:
            _assert_disjoint(f)
            assert np.array_equal(np.sort(np.concatenate([f.train, f.val, f.test])), np.arange(y.size))
            assert _within_one(np.bincount(y[f.test], minlength=n_c.size), n_c / 10)
            outer_train = np.bincount(y[np.concatenate([f.train, f.val])], minlength=n_c.size)
            assert _within_one(np.bincount(y[f.val], minlength=n_c.size), outer_train * 0.1)
            assert not f.training_accuracy and f.protocol == "cv10"
    assert not np.array_equal(folds[0].test, folds[10].test)  # repeats draw different folds
    again = cv10(y, seed=5, repeats=2)
    assert all(np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test) for a, b in zip(folds, again,
                                                                                                  strict=True))


def test_inner_holdout_sees_only_the_training_folds(shared_data: Path) -> None:
    y = _load(shared_data, "mutag").y
    fold = cv10(y, seed=1)[3]
    outer_train = np.sort(np.concatenate([fold.train, fold.val]))
    scrambled = y.copy()
    scrambled[fold.test] = 1 - scrambled[fold.test]  # what the test graphs are must not move the holdout
    for labels in (y, scrambled):
        fit, val = inner_holdout(labels, outer_train, 0.1, seed=123)
        assert not np.intersect1d(val, fold.test).size and not np.intersect1d(fit, fold.test).size
    assert all(np.array_equal(a, b) for a, b in zip(inner_holdout(y, outer_train, 0.1, 123),
                                                    inner_holdout(scrambled, outer_train, 0.1, 123), strict=True))
    with pytest.raises(ValueError, match="read-only"):
        fold.test[0] = 0


def test_authors_protocol_scores_training_graphs(shared_data: Path) -> None:
    y = _load(shared_data, "mutag").y
    folds = authors(y, seed=0, repeats=2)
    assert len(folds) == 20 and all(f.training_accuracy and f.val.size == 0 for f in folds)
    assert all(np.array_equal(f.train, np.arange(y.size)) and np.isin(f.test, f.train).all() for f in folds)
    for r in (0, 1):
        tests = np.concatenate([f.test for f in folds if f.repeat == r])
        assert np.array_equal(np.sort(tests), np.arange(y.size))
    assert all(_within_one(np.bincount(y[f.test], minlength=2), np.bincount(y) / 10) for f in folds)
    assert make_folds("authors", y)[0].protocol == "authors"
    with pytest.raises(ValueError, match="unknown graph classification protocol 'loo'"):
        make_folds("loo", y)
    with pytest.raises(ValueError, match="ships no fold indices"):
        make_folds("stored", y)
    with pytest.raises(ValueError, match="has only 2 graphs"):
        cv10(np.array([0] * 20 + [1, 1]))
