"""Which metrics a report shows, which direction is better, and how cost columns are labelled.

The headline metric of a run is the value at its best-validation epoch (``best/test/<name>``, see
``etbench.tracking.schema``); which names exist depends on the task (image or graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from etbench.analysis import AnalysisError
from etbench.tracking.schema import COST_METRICS, TASK_METRIC_NAMES, best_metric

METRIC_PREFIX = "metrics."

#: Headline metrics per task, most important first (the first present one drives the figures).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    task: tuple(best_metric("test", name) for name in names) for task, names in TASK_METRIC_NAMES.items()
}  # image: mse_masked, psnr; graph: auroc, auprc, macro_f1, rec_at_k; graphcls: acc (etbench.tracking.schema)

#: The one primary metric per task: the comparison tables' Holm family (ET vs every baseline) holds its rows only;
#: every other metric is descriptive (raw p, no verdict). Graph anomaly detection: AUPRC, the metric tuned grids
#: select on (GADBench, Tang et al. 2023, for heavily imbalanced labels); images: the masked-patch MSE; graph
#: classification: held-out accuracy.
PRIMARY_METRIC: dict[str, str] = {
    "image": best_metric("test", "mse_masked"),
    "graph": best_metric("test", "auprc"),
    "graphcls": best_metric("test", "acc"),
}

#: Direction per metric leaf name: True when a larger value is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    "loss": False,
    "mse_masked": False,
    "mse_chosen": False,
    "mse": False,
    "psnr": True,
    "auroc": True,
    "auprc": True,
    "macro_f1": True,
    "rec_at_k": True,
    "acc": True,
    "params": False,
    "flops_per_sample": False,
    "wall_s": False,
    "throughput": True,
    "peak_mem_mb": False,
    "process_peak_rss_mb": False,
    "rise_fraction": False,
}

#: Cost metric → (column label, scale factor applied to the logged value). Labels say train vs inference and
#: per sample vs per step; the process's RSS is its own column, never the model's memory.
COST_COLUMNS: dict[str, tuple[str, float]] = {
    "cost/params": ("params (M)", 1e-6),
    "cost/flops_per_sample": ("inference GFLOPs/sample (fwd)", 1e-9),
    "cost/throughput": ("train throughput (samples/s)", 1.0),
    "cost/peak_mem_mb": ("train-step peak mem (MiB)", 1.0),
    "cost/process_peak_rss_mb": ("process peak RSS (MiB)", 1.0),
}
assert set(COST_COLUMNS) <= set(COST_METRICS)


def column(metric: str) -> str:
    """DataFrame column holding the metric ``metric`` (``metrics.<name>``, as MLflow's search_runs names it)."""
    return metric if metric.startswith(METRIC_PREFIX) else METRIC_PREFIX + metric


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better; raise for a metric whose direction is unknown."""
    leaf = metric.removeprefix(METRIC_PREFIX).rsplit("/", 1)[-1]
    if leaf not in HIGHER_IS_BETTER:
        known = sorted(HIGHER_IS_BETTER)
        raise ValueError(f"unknown direction for metric {metric!r}: its last part must be one of {known}")
    return HIGHER_IS_BETTER[leaf]


def short_name(metric: str) -> str:
    """Human label of a metric: ``best/test/mse_masked`` → ``test mse_masked``."""
    parts = metric.removeprefix(METRIC_PREFIX).split("/")
    if parts[0] == "best":
        parts = parts[1:]
    return " ".join(parts)


def available(runs: pd.DataFrame, metric: str) -> bool:
    """Whether at least one run logged ``metric``."""
    col = column(metric)
    return col in runs.columns and bool(runs[col].notna().any())


def choose_metrics(runs: pd.DataFrame, override: Sequence[str] | None = None) -> list[str]:
    """Headline metrics to report for ``runs`` (one task): the override, checked, or the task's present ones."""
    if override:
        missing = [m for m in override if not available(runs, m)]
        if missing:
            present = sorted(c.removeprefix(METRIC_PREFIX) for c in runs.columns if c.startswith(METRIC_PREFIX))
            raise AnalysisError(f"metric(s) {missing} not logged by any run; logged metrics: {present}")
        for m in override:
            higher_is_better(m)
        return [m.removeprefix(METRIC_PREFIX) for m in override]
    tasks = sorted(set(runs["task"].dropna()))
    chosen: list[str] = []
    for task in tasks:
        if task not in TASK_METRICS:
            raise ValueError(f"unknown etbench.task {task!r}; allowed: {sorted(TASK_METRICS)}")
        chosen += [m for m in TASK_METRICS[task] if available(runs, m) and m not in chosen]
    return chosen


def primary_metric(runs: pd.DataFrame, metrics: Sequence[str]) -> str:
    """The primary metric among ``metrics`` for ``runs`` (one task): the task's declared one
    (:data:`PRIMARY_METRIC`) when it is among them, else the first of ``metrics`` (a user's override)."""
    if not metrics:
        raise ValueError("no metrics to choose a primary one from")
    tasks = sorted(set(runs["task"].dropna())) if "task" in runs else []
    declared = PRIMARY_METRIC.get(str(tasks[0])) if len(tasks) == 1 else None
    names = [m.removeprefix(METRIC_PREFIX) for m in metrics]
    return declared if declared in names else names[0]
