"""Two-level (seed × test item) paired bootstrap of the mean difference between two models (issue 27.4; science
review C10).

The report's intervals run over seeds only, so they describe this test set, not the task: on digits (359 test images,
one fixed mask each) the test-item sampling variance can be as large as the seed variance (Bouthillier et al., MLSys
2021). Given each model's metric **per test item** for every seed, this bootstrap resamples both levels and gives a
percentile interval for the mean paired difference.

**Input contract.** ``diffs[s][i]`` = metric of model A − metric of model B on test item ``i`` after training with
seed ``s``: both models trained with the same seed and scored on the same item (paired at both levels). The metric
must be a mean over items (per-item MSE of an image, 0/1 correctness) so that the mean over items is the run's
score; a ranking metric such as AUROC is not, and does not fit. :func:`paired_differences` builds ``diffs`` from a
long frame (seed, item, model, value).

**Designs.**

- ``crossed`` (etbench's image task: the test images and their masks are fixed, the same for every seed): items are
  shared across seeds, so a replicate draws S seeds and N items with replacement, once each, and averages
  ``diffs[seed_j, item_k]`` over all pairs (the two-way "pigeonhole" bootstrap, Owen, Ann. Appl. Stat. 2007). Its
  variance is σ²_seed/S + σ²_item/N + σ²_interaction/(SN) of the data's two-way decomposition.
- ``nested`` (each seed scored on its own items, e.g. its own split): each drawn seed gets its own item resample
  (Davison & Hinkley 1997, §3.8); seeds may have different item counts.

With one seed both are the ordinary paired bootstrap over items; with identical items, the seed bootstrap of the
seed means. Both are conservative where the lowest level is noisy, because each level's spread already carries the
noise below it: under d = μ + u_seed + v_item + e, the crossed bootstrap's variance is in expectation about
τ²/S + ω²/N + 3σ²/(SN) against the true τ²/S + ω²/N + σ²/(SN), the nested one's counts the within-seed noise twice.
Where the seed and item effects dominate the interval is close to the true one (tests/test_item_bootstrap.py). On
crossed data the nested design is the wrong one: it shrinks the shared item effect ω²/N by a factor of S.

**Where it is used.** Nowhere yet: no task logs per-item test scores (the image task logs sums over the test set,
the graph tasks AUROC/AUPRC over all test nodes), so the report's intervals stay over seeds. A task that writes
per-item scores (seed, item, model, value) can feed :func:`paired_differences` and :func:`item_bootstrap_ci`.
Resampling counts are multinomial draws (equivalent to drawing indices), deterministic given ``seed`` through
numpy's ``Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Design = Literal["crossed", "nested"]
#: Replicates drawn per block (bounds memory: a block holds blocks × items counts).
BLOCK = 1024


@dataclass(frozen=True)
class ItemBootstrapCI:
    """The mean paired difference and its percentile interval from :func:`item_bootstrap_ci`."""

    mean: float
    ci_low: float
    ci_high: float
    n_seeds: int
    n_items: int  # items per seed (nested, unequal counts: the smallest)
    design: Design
    n_resamples: int
    confidence: float


def _as_seeds(diffs: Sequence[Sequence[float]] | np.ndarray, design: Design) -> list[np.ndarray]:
    if design not in ("crossed", "nested"):
        raise ValueError(f"design {design!r}: allowed 'crossed' (items shared by every seed) or 'nested'")
    seeds = [np.asarray(d, dtype=float) for d in diffs]
    if not seeds or any(d.ndim != 1 or d.size == 0 for d in seeds):
        raise ValueError("diffs must hold, for at least one seed, a non-empty 1-D array of per-item differences")
    if any(not np.isfinite(d).all() for d in seeds):
        raise ValueError("diffs contain NaN or infinite values: every (seed, item) pair needs both models' scores")
    if design == "crossed" and len({d.size for d in seeds}) > 1:
        counts = sorted({d.size for d in seeds})
        raise ValueError(f"crossed design: every seed must score the same items (item counts {counts}); use "
                         f"design='nested' when seeds have their own items")
    return seeds


def bootstrap_means(diffs: Sequence[Sequence[float]] | np.ndarray, *, design: Design = "crossed",
                    n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """``n_resamples`` bootstrap replicates of the mean over seeds of the mean over items of ``diffs`` (see the
    module docstring for the contract and the two designs)."""
    seeds = _as_seeds(diffs, design)
    if n_resamples < 1:
        raise ValueError(f"n_resamples {n_resamples} must be ≥ 1")
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, BLOCK):
        b = min(BLOCK, n_resamples - start)
        taken = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b)  # (b, S): times each seed drawn
        if design == "crossed":
            d = np.stack(seeds)  # (S, N)
            n = d.shape[1]
            items = rng.multinomial(n, np.full(n, 1.0 / n), size=b)  # (b, N): one item draw shared by every seed
            per_seed = items @ d.T / n  # (b, S): each seed's mean over the drawn items
            out[start:start + b] = (taken * per_seed).sum(axis=1) / n_seeds
        else:
            total = np.zeros(b)
            for s, d in enumerate(seeds):  # k draws of seed s: k independent item resamples, N·k items in all
                n = d.size
                items = rng.multinomial(taken[:, s] * n, np.full(n, 1.0 / n))  # (b, N_s)
                total += items @ d / n
            out[start:start + b] = total / n_seeds
    return out


def item_bootstrap_ci(diffs: Sequence[Sequence[float]] | np.ndarray, *, design: Design = "crossed",
                      confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> ItemBootstrapCI:
    """The mean paired difference (mean over seeds of the per-seed mean over items) and its two-level bootstrap
    percentile interval at ``confidence``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    seeds = _as_seeds(diffs, design)
    reps = bootstrap_means(seeds, design=design, n_resamples=n_resamples, seed=seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return ItemBootstrapCI(mean=float(np.mean([d.mean() for d in seeds])), ci_low=float(low), ci_high=float(high),
                           n_seeds=len(seeds), n_items=min(d.size for d in seeds), design=design,
                           n_resamples=n_resamples, confidence=confidence)


def paired_differences(items: pd.DataFrame, reference: str, baseline: str, *, value: str = "value"
                       ) -> list[np.ndarray]:
    """Per seed (sorted), ``reference`` − ``baseline`` per item (sorted by item id) from a long frame with columns
    ``seed``, ``item``, ``model`` and ``value``; every (seed, item) of either model must have both (ValueError
    naming the first unpaired ones otherwise), and no (seed, item, model) may appear twice."""
    missing = {"seed", "item", "model", value} - set(items.columns)
    if missing:
        raise ValueError(f"per-item frame lacks column(s) {sorted(missing)}; needs seed, item, model, {value}")
    both = items[items["model"].isin([reference, baseline])]
    if both.duplicated(["seed", "item", "model"]).any():
        raise ValueError("per-item frame has a (seed, item, model) more than once")
    wide = both.pivot(index=["seed", "item"], columns="model", values=value)
    for model in (reference, baseline):
        if model not in wide.columns:
            raise ValueError(f"no per-item values of model {model!r}")
    unpaired = wide[wide[[reference, baseline]].isna().any(axis=1)]
    if len(unpaired):
        shown = ", ".join(f"seed {s} item {i}" for s, i in unpaired.index[:5])
        raise ValueError(f"{len(unpaired)} (seed, item) pairs lack one model's value (first: {shown})")
    wide = wide.sort_index()
    diff = wide[reference] - wide[baseline]
    return [diff.xs(s, level="seed").to_numpy(float) for s in diff.index.get_level_values("seed").unique()]
