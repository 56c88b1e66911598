"""What the tuning searches say about the hyper-parameters: parallel coordinates and fANOVA importance (issue 28.3).

Both read the tuning-stage runs of a tuned grid (``tuning_report.tuned_runs``) and use only runs that FINISHED their
full budget: a run ASHA stopped early holds a truncated score, which is never pooled with full ones.

- ``figures/tuning_parallel.{png,csv}``: one panel per search (a model on one dataset / axis combination); one line
  per configuration across its searched hyper-parameters, coloured by its validation metric (darker = better). Each
  axis is scaled to the range the search drew (log scale for a positive axis spanning ≥ 10×; categories at equal
  spacing in sorted order), so the lines show where the good configurations sit.
- ``tables/tuning_importance.{csv,md}``: per search, each hyper-parameter's share of the validation metric's
  variance by fANOVA (Hutter et al., ICML 2014) through Optuna's ``FanovaImportanceEvaluator`` (a random forest over
  the configurations, fixed seed). The distributions handed to Optuna are the observed ranges (the report reads
  MLflow only, not the grid file), so an importance is relative to what the search actually drew. A search with
  fewer than ``MIN_RUNS_FOR_IMPORTANCE`` full runs, or a hyper-parameter that never varied, gets no number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from etbench.tracking import schema as S

MIN_RUNS_FOR_IMPORTANCE = 4


def full_budget_tuning_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Tuning runs that FINISHED without an early stop, with their validation value in ``value``."""
    if df.empty:
        return df
    tune = df[(df["stage"] == S.STAGE_TUNE) & (df["status"] == "FINISHED")]
    tune = tune[~tune["stopped_early"].apply(lambda v: isinstance(v, str))]  # the tag's text where set
    values = [_num(r.get(f"best/{r['metric']}")) for _, r in tune.iterrows()]
    params = [p if isinstance(p, dict) else {} for p in tune.get("params", pd.Series([None] * len(tune)))]
    return tune.assign(value=values, params=params)[[not math.isnan(v) for v in values]]


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _axis(values: list[Any]) -> tuple[str, list[Any]]:
    """How one hyper-parameter is drawn: ``log`` / ``linear`` (numbers) or ``categorical`` (sorted choices)."""
    nums = [_num(v) if not isinstance(v, bool) else math.nan for v in values]
    if all(not math.isnan(x) for x in nums):
        if min(nums) > 0 and max(nums) >= 10 * min(nums):
            return "log", nums
        return "linear", nums
    return "categorical", sorted({str(v) for v in values})


def scaled(values: list[Any]) -> np.ndarray:
    """Values of one hyper-parameter mapped to [0, 1] as its axis draws them (constant axes sit at ½)."""
    kind, info = _axis(values)
    if kind == "categorical":
        pos = {c: i for i, c in enumerate(info)}
        return np.array([pos[str(v)] / max(1, len(info) - 1) if len(info) > 1 else 0.5 for v in values])
    x = np.log10(info) if kind == "log" else np.asarray(info, dtype=float)
    lo, hi = float(x.min()), float(x.max())
    return np.full(len(x), 0.5) if hi == lo else (x - lo) / (hi - lo)


def parallel_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (search, run, hyper-parameter) with its raw and scaled value and the run's metric."""
    rows: list[dict[str, Any]] = []
    for gid, block in runs.groupby("group", sort=True):
        names = sorted({k for p in block["params"] for k in p})
        for name in names:
            vals = [p.get(name) for p in block["params"]]
            for (_, r), raw, pos in zip(block.iterrows(), vals, scaled(vals), strict=True):
                rows.append({"group": gid, "model": r["model"], "dataset": r.get("dataset"), "run_id": r["run_id"],
                             "param": name, "raw": raw, "scaled": float(pos), "metric": r["metric"],
                             "mode": r["mode"], "value": r["value"]})
    return pd.DataFrame(rows)


def importance_table(runs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """fANOVA importance of each varied hyper-parameter per search (empty rows where there is too little data)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: list[dict[str, Any]] = []
    for gid, block in runs.groupby("group", sort=True):
        names = sorted({k for p in block["params"] for k in p})
        varied = [n for n in names if len({str(p.get(n)) for p in block["params"]}) > 1]
        base = {"group": gid, "model": block["model"].iloc[0], "dataset": block["dataset"].iloc[0],
                "metric": block["metric"].iloc[0], "n_runs": len(block)}
        if len(block) < MIN_RUNS_FOR_IMPORTANCE or not varied:
            why = (f"{len(block)} full-budget runs (< {MIN_RUNS_FOR_IMPORTANCE})" if varied else
                   "no hyper-parameter varied")
            rows += [{**base, "param": n, "importance": math.nan, "note": why} for n in names]
            continue
        dists: dict[str, Any] = {}
        for n in varied:
            kind, info = _axis([p.get(n) for p in block["params"]])
            dists[n] = (CategoricalDistribution(info) if kind == "categorical" else
                        FloatDistribution(min(info), max(info), log=kind == "log"))
        direction = "minimize" if block["mode"].iloc[0] == "min" else "maximize"
        study = optuna.create_study(direction=direction)
        for p, value in zip(block["params"], block["value"], strict=True):
            params = {n: (str(p[n]) if isinstance(dists[n], CategoricalDistribution) else float(p[n]))
                      for n in varied}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value)))
        got = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), normalize=True)
        rows += [{**base, "param": n, "importance": float(got.get(n, math.nan)) if n in varied else math.nan,
                  "note": "" if n in varied else "never varied"} for n in names]
    return pd.DataFrame(rows)


def draw_parallel(table: pd.DataFrame, path: Path) -> None:
    """One panel per search: configurations as lines over the scaled axes, coloured by the validation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    groups = sorted(table["group"].unique())
    fig, axes = plt.subplots(len(groups), 1, figsize=(6.5, 2.4 * len(groups) + 0.4), squeeze=False)
    for ax, gid in zip(axes[:, 0], groups, strict=True):
        block = table[table["group"] == gid]
        names = sorted(block["param"].unique())
        wide = block.pivot_table(index="run_id", columns="param", values="scaled", aggfunc="first")[names]
        value = block.groupby("run_id")["value"].first().loc[wide.index]
        better_low = block["mode"].iloc[0] == "min"
        lines = [list(zip(range(len(names)), row, strict=True)) for row in wide.to_numpy()]
        cmap = plt.get_cmap("viridis" if better_low else "viridis_r")  # dark = good either way
        coll = LineCollection(lines, array=value.to_numpy(), cmap=cmap, linewidths=1.4, alpha=0.85)
        ax.add_collection(coll)
        ax.set_xlim(-0.1, len(names) - 0.9 if len(names) > 1 else 0.1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(range(len(names)), [f"{n.split('.', 1)[-1]}\n{_span(block, n)}" for n in names],
                      fontsize="small")
        ax.set_yticks([0, 1], ["low", "high"], fontsize="small")
        ax.set_title(f"{gid} ({block['model'].iloc[0]}, {len(wide)} full-budget runs)", fontsize="small")
        for i in range(len(names)):
            ax.axvline(i, color="0.8", lw=0.8, zorder=0)
        fig.colorbar(coll, ax=ax, label=f"validation {block['metric'].iloc[0].replace('val/', '', 1)}")
    fig.suptitle("Searched hyper-parameters (axis = range drawn; log where it spans ≥ 10×)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _span(block: pd.DataFrame, name: str) -> str:
    """The drawn range of one axis, as its tick label: ``1e-04 … 0.01 (log)`` or the sorted choices."""
    raw = block.loc[block["param"] == name, "raw"].tolist()
    kind, info = _axis(raw)
    if kind == "categorical":
        return " < ".join(info) if len(info) <= 4 else f"{info[0]} … {info[-1]} ({len(info)})"
    return f"{min(info):.3g} … {max(info):.3g}" + (" (log)" if kind == "log" else "")


def write_tuning_plots(df: pd.DataFrame, out: Path) -> tuple[list[Path], list[Path], str]:
    """Parallel coordinates and importance for the tuning runs in ``df``: (tables, figures, markdown section)."""
    runs = full_budget_tuning_runs(df)
    if runs.empty:
        return [], [], ""
    par = parallel_table(runs)
    if par.empty:
        return [], [], ""
    figures = [out / "figures" / "tuning_parallel.png", out / "figures" / "tuning_parallel.csv"]
    draw_parallel(par, figures[0])
    par.to_csv(figures[1], index=False)
    imp = importance_table(runs)
    csv, md = out / "tables" / "tuning_importance.csv", out / "tables" / "tuning_importance.md"
    imp.to_csv(csv, index=False)
    lines = ["| search | model | hyper-parameter | importance (fANOVA) | full-budget runs |", "|---|---|---|---|---|"]
    for _, r in imp.iterrows():
        val = f"{r['importance']:.2f}" if not math.isnan(r["importance"]) else f"— ({r['note']})"
        lines.append(f"| {r['group']} | {r['model']} | {r['param']} | {val} | {r['n_runs']} |")
    md.write_text("\n".join(lines) + "\n")
    section = "\n".join([
        "### Hyper-parameter importance (tuning runs at full budget)", "",
        "Share of the validation metric's variance explained by each searched hyper-parameter (fANOVA via "
        "Optuna's FanovaImportanceEvaluator, seed 0, over the ranges each search drew); runs ASHA stopped early are "
        "left out. With a dozen configurations per search these are rough: read them as which knob mattered most, "
        "not as precise shares. Figure: figures/tuning_parallel.png (parallel coordinates, coloured by the "
        "validation metric).", "", *lines, ""])
    return [csv, md], figures, section
