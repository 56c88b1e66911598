"""Graph anomaly protocols (SPEC §3): splits, threshold search, metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from etbench.tasks.graph_protocols import (
    anomaly_class_weight,
    best_threshold_macro_f1,
    binary_metrics,
    gadbench_fallback_split,
    recall_at_k,
    select_best_epoch,
    stored_split,
    stratified_split,
)


def labels(n: int = 1000, n_anom: int = 100, seed: int = 0) -> np.ndarray:
    y = np.zeros(n, dtype=np.int64)
    y[np.random.default_rng(seed).choice(n, n_anom, replace=False)] = 1
    return y


def check_partition(split: dict[str, np.ndarray], expected_nodes: np.ndarray) -> None:
    parts = [split["train"], split["val"], split["test"]]
    union = np.concatenate(parts)
    assert union.size == np.unique(union).size, "splits overlap"
    np.testing.assert_array_equal(np.sort(union), np.sort(expected_nodes))


@pytest.mark.parametrize(
    ("ratio", "sizes", "anomalies"),
    [(0.4, (400, 200, 400), (40, 20, 40)), (0.01, (10, 330, 660), (1, 33, 66))],
)
def test_stratified_split_sizes_and_strata(ratio: float, sizes: tuple, anomalies: tuple) -> None:
    y = labels()
    split = stratified_split(y, ratio, seed=3)
    check_partition(split, np.arange(y.size))
    assert tuple(split[k].size for k in ("train", "val", "test")) == sizes
    assert tuple(int(y[split[k]].sum()) for k in ("train", "val", "test")) == anomalies


def test_stratified_split_determinism() -> None:
    y = torch.as_tensor(labels())  # torch input works too
    a, b, c = stratified_split(y, 0.4, 7), stratified_split(y, 0.4, 7), stratified_split(y, 0.4, 8)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["train"], c["train"])


def test_unlabelled_nodes_excluded() -> None:
    y = labels(600, 60)
    y[:100] = -1  # unlabelled by label
    mask = np.ones(600, dtype=bool)
    mask[100:150] = False  # unlabelled by mask (Amazon-style: the caller masks nodes 0..3304)
    split = stratified_split(y, 0.4, 0, labelled_mask=mask)
    check_partition(split, np.arange(150, 600))
    assert split["train"].size == 180 and split["val"].size == 90 and split["test"].size == 180


def test_stratified_split_errors() -> None:
    y = labels(100, 10)
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_ratio must be in"):
            stratified_split(y, ratio, 0)
    with pytest.raises(ValueError, match="labelled_mask has shape"):
        stratified_split(y, 0.4, 0, labelled_mask=np.ones(99, dtype=bool))
    with pytest.raises(ValueError, match=r"only 0 \(normal\) and 1"):
        stratified_split(np.array([0, 1, 2, 0] * 10), 0.4, 0)
    with pytest.raises(ValueError, match="cannot make a stratified split"):
        stratified_split(labels(100, 10), 0.01, 0)  # one training node cannot hold both classes


def test_gadbench_fallback_is_40_20_40() -> None:
    split = gadbench_fallback_split(labels(), seed=0)
    assert [split[k].size for k in ("train", "val", "test")] == [400, 200, 400]


def stored_masks() -> dict[str, torch.Tensor]:
    train = torch.zeros(3, 6, dtype=torch.bool)
    val, test = train.clone(), train.clone()
    train[1, [0, 4]] = True
    val[1, [2]] = True
    test[1, [1, 3, 5]] = True
    return {"train": train, "val": val, "test": test}


def test_stored_split() -> None:
    split = stored_split(stored_masks(), 1)
    assert split["train"].tolist() == [0, 4] and split["val"].tolist() == [2] and split["test"].tolist() == [1, 3, 5]
    with pytest.raises(IndexError, match=r"stores 3 splits \(0..2\)"):
        stored_split(stored_masks(), 3)
    for empty in (None, {}):
        with pytest.raises(ValueError, match="no stored splits; use gadbench_fallback_split"):
            stored_split(empty, 0)
    with pytest.raises(ValueError, match=r"lack keys \['val'\]"):
        stored_split({k: v for k, v in stored_masks().items() if k != "val"}, 0)
    overlapping = stored_masks()
    overlapping["val"][1, 0] = True
    with pytest.raises(ValueError, match="train and val share 1 nodes"):
        stored_split(overlapping, 1)


def test_stored_split_tolokers(shared_data: Path) -> None:
    path = shared_data / "tolokers" / "tolokers.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    with np.load(path) as npz:
        masks = {k: npz[f"{k}_masks"] for k in ("train", "val", "test")}
    for t in (0, 9):
        split = stored_split(masks, t)
        assert [split[k].size for k in ("train", "val", "test")] == [5879, 2939, 2940]
    with pytest.raises(IndexError):
        stored_split(masks, 10)


def test_threshold_hand_example() -> None:
    # y = [0, 0, 1, 1], p = [.1, .4, .35, .8]; macro-F1 of p >= t by hand:
    # t=.1: TP2 FP2 FN0 TN0 → (2/3 + 0)/2 = 1/3;  t=.35: TP2 FP1 TN1 → (4/5 + 2/3)/2 = 11/15
    # t=.4: TP1 FP1 FN1 TN1 → 1/2;  t=.8: TP1 FN1 TN2 → (2/3 + 4/5)/2 = 11/15;  t=inf: (0 + 2/3)/2 = 1/3
    # tie between .35 and .8 → the smaller threshold
    t, f1 = best_threshold_macro_f1(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert t == 0.35 and f1 == pytest.approx(11 / 15)
    # all anomalies scored lowest: predicting none is best, threshold +inf
    t, f1 = best_threshold_macro_f1([1, 0, 0, 0], [0.0, 0.5, 0.6, 0.7])
    assert t == np.inf and f1 == pytest.approx((0 + 6 / 7) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_threshold_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(40) < 0.3).astype(int)
    p = np.round(rng.random(40) * 0.5 + 0.3 * y, 1)  # coarse rounding → many tied scores
    candidates = [*np.unique(p), np.inf]
    scores = [f1_score(y, (p >= c).astype(int), average="macro", zero_division=0) for c in candidates]
    t, f1 = best_threshold_macro_f1(torch.as_tensor(y), torch.as_tensor(p))
    assert f1 == pytest.approx(max(scores), abs=1e-12)
    assert t == candidates[int(np.argmax(scores))]


def test_binary_metrics_hand_example() -> None:
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    m = binary_metrics(y, p, threshold=0.5)
    # AUROC: of 4 (anomaly, normal) pairs, only (.35, .4) is misordered → 3/4
    assert m["auroc"] == pytest.approx(0.75)
    # AP: ranking .8(+) .4(−) .35(+): recall steps 1/2 at precision 1 and 1/2 at precision 2/3 → 5/6
    assert m["auprc"] == pytest.approx(5 / 6)
    # prediction [0, 0, 0, 1]: F1(anomaly) = 2/3, F1(normal) = 4/5 → 11/15
    assert m["macro_f1"] == pytest.approx(11 / 15)
    # K = 2: top-2 scores .8 (anomaly), .4 (normal) → 1/2
    assert m["rec_at_k"] == pytest.approx(0.5)


def test_recall_at_k_hand_examples() -> None:
    # 3 anomalies; top-3 scores .9 (+), .8 (−), .7 (+) → 2/3
    assert recall_at_k([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.2, 0.1]) == pytest.approx(2 / 3)
    # tie at the K-th score is broken by node order: K = 1, nodes 0 and 1 tie at .9, node 0 (normal) wins
    assert recall_at_k([0, 1, 0], [0.9, 0.9, 0.1]) == 0.0
    with pytest.raises(ValueError, match="at least one anomaly"):
        recall_at_k([0, 0], [0.1, 0.2])


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="both normal"):
        binary_metrics([1, 1], [0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        binary_metrics([0, 1], [0.2, 0.3, 0.4], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        best_threshold_macro_f1([0, 1], [0.2, float("nan")])


def test_select_best_epoch() -> None:
    history = [{"val/macro_f1": v, "val/auroc": 0.5} for v in (0.5, 0.7, 0.7, 0.6)]
    assert select_best_epoch(history) == 1  # tie between epochs 1 and 2 → earliest
    assert select_best_epoch(history, key="val/auroc") == 0
    with pytest.raises(KeyError, match="epoch 0 has no metric 'val/auprc'"):
        select_best_epoch(history, key="val/auprc")
    with pytest.raises(ValueError, match="empty"):
        select_best_epoch([])


def test_anomaly_class_weight() -> None:
    w = anomaly_class_weight(torch.tensor([0, 0, 0, 1, 0, 1]))
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="no anomalies"):
        anomaly_class_weight(np.zeros(5, dtype=int))
