"""Graph anomaly detection protocols (SPEC §3): splits, decision thresholds, metrics, best-epoch selection.

Pure functions on numpy / torch; no models, no files.
- "bwgnn" (Tang et al., ICML 2022; used by the ET paper): seeded stratified split, train ratio 0.01 or 0.40, the rest
  validation:test = 1:2; every epoch the threshold maximising validation macro-F1; report test metrics at the epoch
  with the best validation macro-F1.
- "gadbench" (Tang et al., NeurIPS 2023): trial t uses stored split t where the dataset ships splits; metrics
  AUROC, AUPRC, Rec@K.
Labels are binary: 1 = anomaly, 0 = normal, −1 = unlabelled (excluded from every split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import train_test_split

ProtocolName = Literal["bwgnn", "gadbench"]
PROTOCOLS: tuple[str, ...] = ("bwgnn", "gadbench")
SPLIT_KEYS = ("train", "val", "test")
VAL_SHARE_OF_REST = 1.0 / 3.0  # validation:test = 1:2 of the nodes left after training
GADBENCH_FALLBACK_TRAIN_RATIO = 0.4  # GADBench default 40/20/40 for datasets without stored splits


def _numpy(a: np.ndarray | torch.Tensor | Sequence[float], name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _scores(prob: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    p = _numpy(prob, "prob").astype(np.float64)
    if p.size != n:
        raise ValueError(f"y_true and prob must have equal length, got {n} and {p.size}")
    if not np.isfinite(p).all():
        raise ValueError("prob contains NaN or infinite scores")
    return p


def _binary_labels(y: np.ndarray | torch.Tensor, name: str = "y_true") -> np.ndarray:
    arr = _numpy(y, name)
    bad = np.setdiff1d(np.unique(arr), [0, 1])
    if bad.size:
        raise ValueError(f"{name} must contain only 0 (normal) and 1 (anomaly); found {bad[:5].tolist()}")
    return arr.astype(np.int64)


def stratified_split(
    y: np.ndarray | torch.Tensor,
    train_ratio: float,
    seed: int,
    labelled_mask: np.ndarray | torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Protocol "bwgnn": sorted node-index arrays {"train", "val", "test"}, stratified by label and seeded.

    round(train_ratio · n_labelled) nodes train; the rest is split validation:test = 1:2 (validation size rounded),
    also stratified (both with sklearn's train_test_split and random_state=seed).
    Nodes with y == −1 or labelled_mask False are in no split.
    """
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1) (the bwgnn protocol uses 0.01 or 0.40), got {train_ratio}")
    raw = _numpy(y, "y")
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise ValueError("y must hold integer labels (1 anomaly, 0 normal, −1 unlabelled); found fractional values")
    labels = raw.astype(np.int64)
    keep = labels != -1
    if labelled_mask is not None:
        mask = _numpy(labelled_mask, "labelled_mask").astype(bool)
        if mask.shape != labels.shape:
            raise ValueError(f"labelled_mask has shape {mask.shape}, expected {labels.shape} (one flag per node)")
        keep &= mask
    idx = np.flatnonzero(keep)
    _binary_labels(labels[idx], "y (labelled nodes)")
    n_train = round(train_ratio * idx.size)
    try:
        train, rest = train_test_split(idx, train_size=n_train, stratify=labels[idx], random_state=seed)
        n_val = round(VAL_SHARE_OF_REST * rest.size)
        val, test = train_test_split(rest, train_size=n_val, stratify=labels[rest], random_state=seed)
    except ValueError as err:
        counts = np.bincount(labels[idx], minlength=2).tolist()
        raise ValueError(
            f"cannot make a stratified split with train_ratio={train_ratio} of {idx.size} labelled nodes "
            f"(class counts normal/anomaly = {counts}): {err}"
        ) from err
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def gadbench_fallback_split(
    y: np.ndarray | torch.Tensor, seed: int, labelled_mask: np.ndarray | torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Protocol "gadbench" for a dataset without stored splits: seeded stratified 40/20/40 train/val/test."""
    return stratified_split(y, GADBENCH_FALLBACK_TRAIN_RATIO, seed, labelled_mask)


def stored_split(splits: Mapping[str, torch.Tensor | np.ndarray] | None, index: int) -> dict[str, np.ndarray]:
    """Protocol "gadbench": node-index arrays of stored split ``index``.

    ``splits`` maps "train", "val", "test" to boolean masks of shape (S, N), one row per stored split.

    Raises when the dataset has no stored splits (the caller must then choose ``gadbench_fallback_split``
    explicitly, a seeded stratified 40/20/40 split) or when index is not in 0..S−1.
    """
    if not splits:
        raise ValueError("this dataset has no stored splits; use gadbench_fallback_split (stratified 40/20/40)")
    missing = [k for k in SPLIT_KEYS if k not in splits]
    if missing:
        raise ValueError(f"stored splits lack keys {missing}; expected {list(SPLIT_KEYS)}, got {sorted(splits)}")
    masks = {}
    for key in SPLIT_KEYS:
        m = splits[key]
        arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if arr.ndim != 2 or arr.dtype != np.bool_:
            raise ValueError(f"stored split {key!r} must be a bool array of shape (S, N), got {arr.dtype} {arr.shape}")
        masks[key] = arr
    shapes = {k: v.shape for k, v in masks.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"stored split masks disagree in shape: {shapes}")
    num_splits = masks["train"].shape[0]
    if not 0 <= index < num_splits:
        raise IndexError(f"split index {index} out of range: the dataset stores {num_splits} splits "
                         f"(0..{num_splits - 1})")
    chosen = {k: np.flatnonzero(v[index]) for k, v in masks.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        overlap = np.intersect1d(chosen[a], chosen[b]).size
        if overlap:
            raise ValueError(f"stored split {index}: {a} and {b} share {overlap} nodes")
    return chosen


def best_threshold_macro_f1(y_true: np.ndarray | torch.Tensor, prob: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(threshold, macro-F1) maximising macro-F1 of the rule ``prob >= threshold``.

    Candidates are every distinct score plus +inf (predict no anomaly); all are scored at once from cumulative
    counts (O(n log n)). F1 of a class with no true and no predicted members counts as 0 (sklearn's zero_division=0).
    Ties go to the smallest threshold.
    """
    y = _binary_labels(y_true)
    p = _scores(prob, y.size)
    if y.size == 0:
        raise ValueError("cannot choose a threshold on an empty evaluated set")
    values, inverse = np.unique(p, return_inverse=True)  # ascending
    pos_at = np.bincount(inverse, weights=y, minlength=values.size)
    all_at = np.bincount(inverse, minlength=values.size).astype(np.float64)
    # predicted positive for threshold values[j]: all scores >= values[j] (reverse cumulative sums); +inf → none
    tp = np.append(np.cumsum(pos_at[::-1])[::-1], 0.0)
    pp = np.append(np.cumsum(all_at[::-1])[::-1], 0.0)
    n_pos, n = float(y.sum()), float(y.size)
    fp, fn = pp - tp, n_pos - tp
    tn = n - n_pos - fp
    f1_pos = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    f1_neg = np.divide(2 * tn, 2 * tn + fp + fn, out=np.zeros_like(tn), where=(2 * tn + fp + fn) > 0)
    macro = (f1_pos + f1_neg) / 2
    best = int(np.argmax(macro))
    thresholds = np.append(values, np.inf)
    return float(thresholds[best]), float(macro[best])


def recall_at_k(y_true: np.ndarray | torch.Tensor, prob: np.ndarray | torch.Tensor) -> float:
    """Rec@K with K = number of anomalies: the fraction of true anomalies among the K highest scores.

    Ties at the K-th score are broken by node order (stable sort on the negated score).
    """
    y = _binary_labels(y_true)
    p = _scores(prob, y.size)
    k = int(y.sum())
    if k == 0:
        raise ValueError("Rec@K needs at least one anomaly in the evaluated set (K = number of anomalies = 0)")
    top = np.argsort(-p, kind="stable")[:k]
    return float(y[top].sum() / k)


def binary_metrics(
    y_true: np.ndarray | torch.Tensor, prob: np.ndarray | torch.Tensor, threshold: float
) -> dict[str, float]:
    """AUROC, AUPRC (average precision), macro-F1 of ``prob >= threshold`` and Rec@K on one evaluated set."""
    y = _binary_labels(y_true)
    p = _scores(prob, y.size)
    if np.unique(y).size < 2:
        raise ValueError("AUROC/AUPRC need both normal (0) and anomalous (1) nodes in the evaluated set")
    return {
        "auroc": float(roc_auc_score(y, p)),
        "auprc": float(average_precision_score(y, p)),
        "macro_f1": float(f1_score(y, (p >= threshold).astype(np.int64), average="macro", zero_division=0)),
        "rec_at_k": recall_at_k(y, p),
    }


def select_best_epoch(history: Sequence[Mapping[str, float]], key: str = "val/macro_f1") -> int:
    """Index of the epoch with the highest ``history[i][key]``; ties go to the earliest epoch."""
    if not history:
        raise ValueError("history is empty: no epoch to select")
    values = []
    for i, row in enumerate(history):
        if key not in row:
            raise KeyError(f"epoch {i} has no metric {key!r}; it has {sorted(row)}")
        v = float(row[key])
        if math.isnan(v):
            raise ValueError(f"epoch {i}: metric {key!r} is NaN")
        values.append(v)
    return int(np.argmax(values))


def anomaly_class_weight(y_train: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Cross-entropy class weights [1, #normal / #anomalous] from the training labels (SPEC §3)."""
    y = _binary_labels(y_train, "y_train")
    n_anom = int(y.sum())
    if n_anom == 0:
        raise ValueError("the training split holds no anomalies: the class weight #normal / #anomalous is undefined")
    return torch.tensor([1.0, (y.size - n_anom) / n_anom], dtype=torch.float32)
