"""Aggregates across datasets/tasks, as papers now report them (Agarwal et al., NeurIPS 2021, "Deep Reinforcement
Learning at the Edge of the Statistical Precipice"): the interquartile mean (IQM) of all runs of all tasks, with a
stratified-bootstrap interval, and the probability of improvement P(ET > baseline) averaged over tasks.

A *task* is one (dataset, protocol) pair; its *runs* are every finished run of a method there (seeds × splits). A
*method* is a model with the axis values it was run with (``et (steps=6)``), so no configuration is chosen after
looking at test numbers. Implemented with numpy/scipy (rliable, the authors' library, is archived).

Scores of bounded metrics (AUROC, AUPRC, macro-F1, Rec@K, accuracy: all in [0, 1]) are pooled as they are; any
other metric (MSE, PSNR) is min–max normalised per task over all runs of all methods there, so that tasks weigh
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from etbench.analysis.metrics import column, higher_is_better, short_name
from etbench.analysis.style import model_order
from etbench.analysis.tables import NA_AXIS, Table, latex_escape

BOUNDED = ("auroc", "auprc", "macro_f1", "rec_at_k", "acc")
TASK_KEYS = ["dataset", "protocol"]


@dataclass(frozen=True)
class AggregateConfig:
    """Stratified-bootstrap settings (percentile interval, as in Agarwal et al.)."""

    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1 or self.n_resamples < 1:
            raise ValueError(f"AggregateConfig: confidence {self.confidence} must lie in (0, 1) and n_resamples "
                             f"{self.n_resamples} be ≥ 1")


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50 % (``scipy.stats.trim_mean`` cutting 25 % at each end)."""
    return float(stats.trim_mean(np.asarray(scores, dtype=float).ravel(), 0.25))


def _trim_rows(samples: np.ndarray) -> np.ndarray:
    return np.asarray(stats.trim_mean(samples, 0.25, axis=1), dtype=float)


def stratified_iqm(per_task: Sequence[np.ndarray], cfg: AggregateConfig = AggregateConfig()) -> dict[str, float]:
    """IQM of the pooled runs and its interval from resampling runs *within* each task (stratified bootstrap)."""
    rng = np.random.default_rng(cfg.seed)
    parts = [np.asarray(x, dtype=float) for x in per_task]
    point = iqm(np.concatenate(parts))
    boot = np.concatenate([x[rng.integers(0, x.size, size=(cfg.n_resamples, x.size))] for x in parts], axis=1)
    low, high = np.quantile(_trim_rows(boot), [(1 - cfg.confidence) / 2, (1 + cfg.confidence) / 2])
    return {"iqm": point, "ci_low": float(low), "ci_high": float(high),
            "n_tasks": len(parts), "n_runs": int(sum(x.size for x in parts))}


def _p_better(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + ½ P(X = Y) over all run pairs, on the last two axes (the Mann–Whitney U / (n·m))."""
    diff = x[..., :, None] - y[..., None, :]
    return np.asarray(((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1)), dtype=float)


def probability_of_improvement(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], higher: bool,
                               cfg: AggregateConfig = AggregateConfig()) -> dict[str, float]:
    """Mean over tasks of P(X better than Y) in that task, with a stratified-bootstrap interval.

    ``xs[m]``, ``ys[m]``: runs of the two methods on task m; ``higher`` is the metric's direction.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need the same, non-zero number of tasks for both methods; got {len(xs)} and {len(ys)}")
    sign = 1.0 if higher else -1.0
    rng = np.random.default_rng(cfg.seed)
    point, boot = [], []
    for x, y in zip(xs, ys, strict=True):
        x, y = sign * np.asarray(x, dtype=float), sign * np.asarray(y, dtype=float)
        point.append(float(_p_better(x, y)))
        bx = x[rng.integers(0, x.size, size=(cfg.n_resamples, x.size))]
        by = y[rng.integers(0, y.size, size=(cfg.n_resamples, y.size))]
        boot.append(_p_better(bx, by))
    low, high = np.quantile(np.mean(boot, axis=0), [(1 - cfg.confidence) / 2, (1 + cfg.confidence) / 2])
    return {"p_improve": float(np.mean(point)), "ci_low": float(low), "ci_high": float(high), "n_tasks": len(xs)}


def _leaf(metric: str) -> str:
    return metric.removeprefix("metrics.").rsplit("/", 1)[-1]


def method_labels(runs: pd.DataFrame, axes: Sequence[str]) -> pd.Series:
    """"model" or "model (axis=value, …)" with the axis values each run has."""
    def label(row: pd.Series) -> str:
        parts = [f"{a.rsplit('.', 1)[-1]}={row[a]}" for a in axes if pd.notna(row[a])]
        return f"{row['model']} ({', '.join(parts)})" if parts else str(row["model"])

    return runs.apply(label, axis=1) if len(runs) else pd.Series([], dtype=object)


def normalised_scores(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The metric's values, min–max normalised per task unless the metric is bounded in [0, 1]."""
    value = runs[column(metric)].astype(float)
    if _leaf(metric) in BOUNDED:
        return value
    grouped = value.groupby([runs[k] for k in TASK_KEYS])
    low, high = grouped.transform("min"), grouped.transform("max")
    span = (high - low).where(high > low)
    return ((value - low) / span).fillna(0.5)


def aggregate(runs: pd.DataFrame, metric: str, axes: Sequence[str] = (), *, reference: str = "et",
              cfg: AggregateConfig = AggregateConfig()) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """IQM per method and P(reference method better than each baseline method) across the tasks of ``runs``.

    Only methods with runs on every task are aggregated; the others are named in the returned notes.
    """
    scored = runs[runs[column(metric)].notna()] if column(metric) in runs.columns else runs.iloc[0:0]
    notes: list[str] = []
    tasks = sorted(set(map(tuple, scored[TASK_KEYS].to_numpy().tolist())))
    if len(tasks) < 2:
        return pd.DataFrame(), pd.DataFrame(), [f"aggregate {short_name(metric)}: {len(tasks)} dataset/protocol "
                                                f"pair(s) with this metric; needs ≥ 2"]
    scored = scored.assign(_method=method_labels(scored, axes), _score=normalised_scores(scored, metric))
    per_method: dict[str, list[np.ndarray]] = {}
    models: dict[str, str] = {}
    for method, g in scored.groupby("_method", sort=True):
        by_task = {tuple(k): v["_score"].to_numpy(float) for k, v in g.groupby(TASK_KEYS, sort=True)}
        if set(by_task) != set(tasks):
            notes.append(f"aggregate {short_name(metric)}: {method} left out, runs on {len(by_task)} of "
                         f"{len(tasks)} dataset/protocol pairs")
            continue
        per_method[str(method)] = [by_task[t] for t in tasks]
        models[str(method)] = str(g["model"].iloc[0])
    order = {m: i for i, m in enumerate(model_order(set(models.values())))}
    methods = sorted(per_method, key=lambda m: (order[models[m]], m))
    iqm_rows = [{"method": m, "model": models[m], **stratified_iqm(per_method[m], cfg)} for m in methods]
    higher = higher_is_better(metric)
    poi_rows = [{"method": r, "baseline": b, **probability_of_improvement(per_method[r], per_method[b], higher, cfg)}
                for r in methods if models[r] == reference for b in methods if models[b] != reference]
    return pd.DataFrame(iqm_rows), pd.DataFrame(poi_rows), notes


def _interval(point: float, low: float, high: float) -> str:
    return NA_AXIS if pd.isna(point) else f"{point:.3f} [{low:.3f}, {high:.3f}]"


def aggregate_tables(runs: pd.DataFrame, metrics: Sequence[str], axes: Sequence[str] = (), *, task: str,
                     reference: str = "et", cfg: AggregateConfig = AggregateConfig()) -> tuple[list[Table], list[str]]:
    """One table per metric (IQM per method, then P(reference better) per baseline) when ≥ 2 tasks have it."""
    out, notes = [], []
    for metric in metrics:
        iqm_rows, poi_rows, why = aggregate(runs, metric, axes, reference=reference, cfg=cfg)
        notes += why
        if iqm_rows.empty:
            continue
        tasks = sorted(set(runs.loc[runs[column(metric)].notna(), "dataset"].astype(str)))
        display = pd.DataFrame({
            "method": iqm_rows["method"],
            "vs": NA_AXIS,
            "IQM [95% CI]": [_interval(r.iqm, r.ci_low, r.ci_high) for r in iqm_rows.itertuples()],
            f"P({reference} better) [95% CI]": NA_AXIS,
            "tasks": iqm_rows["n_tasks"].astype(str),
            "runs": iqm_rows["n_runs"].astype(str),
        })
        if not poi_rows.empty:
            extra = pd.DataFrame({
                "method": poi_rows["method"], "vs": poi_rows["baseline"], "IQM [95% CI]": NA_AXIS,
                f"P({reference} better) [95% CI]": [_interval(r.p_improve, r.ci_low, r.ci_high)
                                                    for r in poi_rows.itertuples()],
                "tasks": poi_rows["n_tasks"].astype(str), "runs": NA_AXIS})
            display = pd.concat([display, extra], ignore_index=True)
        bold = pd.DataFrame(False, index=display.index, columns=display.columns)
        norm = ("raw scores (bounded in [0, 1])" if _leaf(metric) in BOUNDED
                else "scores min–max normalised per task over all runs there")
        caption = (
            f"Across {len(tasks)} datasets ({', '.join(tasks)}), {short_name(metric)} "
            f"({'higher' if higher_is_better(metric) else 'lower'} is better): interquartile mean (IQM) of all runs "
            f"of all tasks, {norm}; probability that a run of the {reference} configuration beats a run of the "
            f"baseline (ties ½), averaged over tasks (Agarwal et al., NeurIPS 2021). 95% intervals: stratified "
            f"bootstrap (runs resampled within each task), {cfg.n_resamples} resamples, seed {cfg.seed}, "
            f"percentile. Methods without runs on every task are left out."
        )
        data = pd.concat([iqm_rows.assign(kind="iqm"), poi_rows.assign(kind="p_improve")], ignore_index=True)
        name = f"aggregate_{task}_{_leaf(metric)}"
        title = f"{task}: {short_name(metric)} across datasets (IQM, probability of improvement)"
        out.append(Table(name, title, caption, display, display.map(latex_escape), bold,
                         data.assign(metric=metric)))
    return out, notes
