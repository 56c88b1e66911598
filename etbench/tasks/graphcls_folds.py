"""Graph classification folds (SPEC §5): which graphs fit a model, which select it, which score it.

Pure functions of the class labels; no models, no files. Protocols:
- ``cv10`` (Errica et al., "A Fair Comparison of Graph Neural Networks for Graph Classification", ICLR 2020; the
  default): stratified 10-fold outer CV with a fold seed; inside each outer fold a stratified holdout of the
  *training* folds only (``val_fraction``, 10 %) selects the model and the epoch, and the outer test fold is scored
  once. Repetitions draw fresh fold seeds.
- ``authors``: the ET authors' TU evaluation replicated. Their notebooks fit one model on every graph and then score
  it on stratified folds of that same data, so every fold's ``test`` lies inside its ``train`` and the accuracy it
  gives is TRAINING accuracy (``GraphFold.training_accuracy`` is True); it must be shown as such.
- ``stored``: the (train, test) index files a source ships (DD's ``10fold_idx``, DGCNN / GIN style), with the same
  inner holdout carved from the stored training part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

ProtocolName = Literal["cv10", "authors", "stored"]
PROTOCOLS: tuple[str, ...] = ("cv10", "authors", "stored")
N_FOLDS = 10
VAL_FRACTION = 0.1  # inner holdout: share of the outer training folds kept for model / epoch selection


@dataclass(frozen=True)
class GraphFold:
    """One fold's graph indices (sorted, int64). ``val`` is empty where a protocol selects nothing (``authors``)."""

    protocol: str
    repeat: int
    fold: int
    seed: int  # the fold seed this fold was drawn with
    train: np.ndarray  # graphs the model is fitted on
    val: np.ndarray  # inner holdout for model and epoch selection, disjoint from train and test
    test: np.ndarray  # graphs scored
    training_accuracy: bool = False  # True when test ⊂ train: the score is training accuracy, not generalisation

    def __post_init__(self) -> None:
        for part in (self.train, self.val, self.test):
            part.setflags(write=False)  # frozen means frozen: folds are shared between trials

    def sizes(self) -> dict[str, int]:
        return {"train": int(self.train.size), "val": int(self.val.size), "test": int(self.test.size)}


def _labels(y: np.ndarray | Sequence[int], n_folds: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"y must be a non-empty 1-D integer array of class labels, got shape {arr.shape} {arr.dtype}")
    values, counts = np.unique(arr, return_counts=True)
    if counts.min() < n_folds:
        raise ValueError(f"class {values[counts.argmin()]} has only {counts.min()} graphs; stratified {n_folds}-fold "
                         f"CV needs at least {n_folds} per class")
    return arr.astype(np.int64)


def _inner_seed(fold_seed: int, fold: int) -> int:
    """A seed for fold ``fold``'s inner holdout, distinct across folds and repeats (and below 2**32 for sklearn)."""
    return int(np.random.SeedSequence([fold_seed, fold]).generate_state(1)[0])


def inner_holdout(y: np.ndarray, train: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the outer training indices ``train`` into (fit, val), stratified by ``y[train]``; test never enters."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    fit, val = train_test_split(train, test_size=val_fraction, stratify=y[train], random_state=seed)
    return np.sort(fit).astype(np.int64), np.sort(val).astype(np.int64)


def cv10(y: np.ndarray | Sequence[int], *, seed: int = 0, repeats: int = 1, n_folds: int = N_FOLDS,
         val_fraction: float = VAL_FRACTION) -> tuple[GraphFold, ...]:
    """``repeats`` × ``n_folds`` folds; repeat r uses fold seed ``seed + r`` for the outer StratifiedKFold."""
    arr = _labels(y, n_folds)
    folds = []
    for r in range(repeats):
        fold_seed = seed + r
        outer = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=fold_seed)
        for k, (train, test) in enumerate(outer.split(np.zeros(arr.size), arr)):
            fit, val = inner_holdout(arr, train, val_fraction, _inner_seed(fold_seed, k))
            folds.append(GraphFold("cv10", r, k, fold_seed, fit, val, np.sort(test).astype(np.int64)))
    return tuple(folds)


def authors(y: np.ndarray | Sequence[int], *, seed: int = 0, repeats: int = 1,
            n_folds: int = N_FOLDS) -> tuple[GraphFold, ...]:
    """The ET authors' evaluation: ``train`` is every graph, ``test`` a stratified fold of them (training accuracy).

    Their reported mean ± std is over repeated 10-fold scorings of one model trained on the whole dataset; the folds
    here are StratifiedKFold with fold seed ``seed + r``, which only decides which graphs each score averages over.
    """
    arr = _labels(y, n_folds)
    everything = np.arange(arr.size, dtype=np.int64)
    folds = []
    for r in range(repeats):
        outer = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed + r)
        for k, (_, test) in enumerate(outer.split(np.zeros(arr.size), arr)):
            folds.append(GraphFold("authors", r, k, seed + r, everything, np.empty(0, np.int64),
                                   np.sort(test).astype(np.int64), training_accuracy=True))
    return tuple(folds)


def stored(y: np.ndarray | Sequence[int], splits: Sequence[tuple[np.ndarray, np.ndarray]], *, seed: int = 0,
           val_fraction: float = VAL_FRACTION) -> tuple[GraphFold, ...]:
    """The shipped ``(train, test)`` pairs (``GraphClsDataset.stored_folds``), each with an inner holdout of its
    training part. DD's ten files test 117 graphs each, 1170 of the 1178 in all: 8 graphs are never tested."""
    arr = np.asarray(y, dtype=np.int64)
    if not splits:
        raise ValueError("this dataset ships no fold indices; use protocol 'cv10'")
    folds = []
    for k, (train, test) in enumerate(splits):
        train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
        both = np.concatenate([train, test])
        if np.intersect1d(train, test).size or both.min() < 0 or both.max() >= arr.size:
            raise ValueError(f"stored fold {k}: train and test must be disjoint indices in 0..{arr.size - 1}")
        fit, val = inner_holdout(arr, train, val_fraction, _inner_seed(seed, k))
        folds.append(GraphFold("stored", 0, k, seed, fit, val, np.sort(test)))
    return tuple(folds)


def make_folds(protocol: str, y: np.ndarray | Sequence[int], *, seed: int = 0, repeats: int = 1,
               splits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
               val_fraction: float = VAL_FRACTION) -> tuple[GraphFold, ...]:
    """The folds of ``protocol`` (one of ``PROTOCOLS``); ``splits`` only for ``stored``."""
    if protocol == "cv10":
        return cv10(y, seed=seed, repeats=repeats, val_fraction=val_fraction)
    if protocol == "authors":
        return authors(y, seed=seed, repeats=repeats)
    if protocol == "stored":
        return stored(y, splits or (), seed=seed, val_fraction=val_fraction)
    raise ValueError(f"unknown graph classification protocol {protocol!r}; known: {list(PROTOCOLS)}")
