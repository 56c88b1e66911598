"""Report of a tuned grid (``etbench.stage`` tags): the comparison of final runs, budget curves, sensitivity.

- ``tables/tuned_comparison.{csv,md}``: per model (and axis combination), the final runs' test and validation
  metric (mean ± std over seeds/splits, n) with the chosen hyper-parameters and the tuning run they came from.
  Only final-stage runs enter it: test metrics of tuning runs are never compared.
- ``figures/tuning_budget.{png,csv}``, ``tuning_budget_spread.csv``: best full-budget validation metric found vs
  configurations tried, per search (a model on one dataset / axis combination, per search seed), with the expected
  best over random orders without replacement (:mod:`etbench.analysis.budget`) and, for groups searched with
  several seeds, the range across searches — how much did another search seed change?
- ``figures/tuning_sensitivity.{png,csv}``: validation metric of every tuning run vs its learning rate, coloured
  by model (log x-axis).
- ``figures/tuning_parallel.{png,csv}``, ``tables/tuning_importance.{csv,md}``: parallel coordinates and fANOVA
  importance of the searched hyper-parameters (:mod:`etbench.analysis.tuning_plots`).

Reads MLflow only; imports nothing from the engine or the sweep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from etbench.analysis.budget import budget_curves, budget_spread, draw_group
from etbench.analysis.tuning_edges import EDGE_FRACTION, edge_notes, parse_space
from etbench.analysis.tuning_plots import write_tuning_plots
from etbench.tracking import schema as S

UNTUNED_NOTE = ("Hyper-parameters (learning rate, init) were fixed by this grid, not tuned per model: a comparison "
                "here may reflect those defaults more than the models. Grids with an equal tuning budget per model: "
                "experiments/image_tuned_vs_transformers.yaml, experiments/graph_tuned_vs_gnns.yaml.\n")


@dataclass
class TuningReport:
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    section: str = ""


def tuned_runs(client: Any, experiment: str) -> pd.DataFrame:
    """One row per run with a stage tag: ids, stage, group, model, seed, split, status, start, params, metrics."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"tags.`{S.TAG_STAGE}` != ''",
                                  max_results=1000, page_token=token)
        for r in page:
            t = r.data.tags
            metric, _, mode = t.get(S.TAG_TUNE_METRIC, ":").partition(":")
            rows.append({"run_id": r.info.run_id, "stage": t.get(S.TAG_STAGE), "group": t.get(S.TAG_TUNE_GROUP),
                         "model": t.get(S.TAG_MODEL), "dataset": t.get(S.TAG_DATASET), "seed": t.get(S.TAG_SEED),
                         "split": t.get(S.TAG_SPLIT), "status": r.info.status, "start": r.info.start_time,
                         "params": json.loads(t.get(S.TAG_TUNE_PARAMS, "{}")), "tuned_from": t.get(S.TAG_TUNED_FROM),
                         "stopped_early": t.get(S.TAG_STOPPED_EARLY), "search": t.get(S.TAG_TUNE_SEARCH_SEED),
                         "space": t.get(S.TAG_TUNE_SPACE),
                         "metric": metric, "mode": mode or "min",
                         "lr": _float(r.data.params.get("train.lr")),
                         **{k: v for k, v in r.data.metrics.items() if k.startswith("best/")}})
        token = page.token
        if not token:
            return pd.DataFrame(rows)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def final_run_ids(client: Any, experiment: str) -> set[str] | None:
    """The final-stage run ids of a tuned experiment (``None`` when the experiment was not tuned)."""
    df = tuned_runs(client, experiment)
    if df.empty:
        return None
    return set(df.loc[df["stage"] == S.STAGE_FINAL, "run_id"])


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in sorted(params.items()))


def comparison_table(df: pd.DataFrame) -> pd.DataFrame:
    """Final runs only (FINISHED), per group: test and validation metric mean/std/n, the chosen hyper-parameters."""
    fin = df[(df["stage"] == S.STAGE_FINAL) & (df["status"] == "FINISHED")]
    rows = []
    for gid, block in fin.groupby("group", sort=True):
        metric = str(block["metric"].iloc[0])
        test = f"best/{metric.replace('val/', 'test/', 1)}"
        val = f"best/{metric}"
        row: dict[str, Any] = {"group": gid, "model": block["model"].iloc[0], "dataset": block["dataset"].iloc[0],
                               "n": len(block), "metric": metric.replace("val/", "", 1)}
        for name, col in (("test", test), ("val", val)):
            vals = pd.to_numeric(block[col], errors="coerce") if col in block else pd.Series(dtype=float)
            row[f"{name}_mean"], row[f"{name}_std"] = float(vals.mean()), float(vals.std(ddof=1))
        row["chosen"] = _fmt_params(block["params"].iloc[0])
        space = block["space"].iloc[0] if "space" in block else None  # a store read before the tag existed
        row["at_range_edge"] = edge_notes(block["params"].iloc[0], parse_space(space))
        row["tuned_from"] = block["tuned_from"].iloc[0]
        rows.append(row)
    return pd.DataFrame(rows)


def sensitivity(df: pd.DataFrame) -> pd.DataFrame:
    """Every FINISHED tuning run's learning rate and validation metric."""
    tune = df[(df["stage"] == S.STAGE_TUNE) & (df["status"] == "FINISHED")]
    # the stopped-early tag is a string where set and NaN (truthy) where absent
    rows = [{"group": r["group"], "model": r["model"], "lr": r["lr"], "value": _float(r.get(f"best/{r['metric']}")),
             "metric": r["metric"], "stopped_early": isinstance(r["stopped_early"], str)} for _, r in tune.iterrows()]
    return pd.DataFrame(rows)


def write_tuning_report(client: Any, experiment: str, out: Path) -> TuningReport | None:
    """Write the tuned comparison, budget curves and sensitivity into ``out`` (``None``: not a tuned grid)."""
    df = tuned_runs(client, experiment)
    if df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = TuningReport()
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    table = comparison_table(df)
    csv, md = out / "tables" / "tuned_comparison.csv", out / "tables" / "tuned_comparison.md"
    table.to_csv(csv, index=False)
    lines = ["| model | dataset | group | n | test (mean ± std) | val (mean ± std) | chosen hyper-parameters | "
             "at a range edge |", "|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['model']} | {r['dataset']} | {r['group']} | {r['n']} | {r['test_mean']:.4g} ± "
                     f"{r['test_std']:.2g} | {r['val_mean']:.4g} ± {r['val_std']:.2g} | {r['chosen']} | "
                     f"{r['at_range_edge'] or '—'} |")
    metric = table["metric"].iloc[0] if len(table) else "?"
    md.write_text("\n".join(lines) + "\n")
    rep.tables += [csv, md]
    curves, sens = budget_curves(df), sensitivity(df)
    labels = table.set_index("group")["dataset"].to_dict() if len(table) else {}
    datasets = sorted({str(v) for v in labels.values()}) or [""]
    models = sorted({str(m) for m in df["model"]})
    colour = {m: f"C{i % 10}" for i, m in enumerate(models)}  # one colour per model in every panel

    def panels(title: str) -> tuple[Any, dict[str, Any]]:
        """One panel per dataset (a search's metric is only comparable within its dataset), legend outside."""
        fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 1.8, 4), squeeze=False)
        fig.suptitle(title)
        return fig, {d: ax for d, ax in zip(datasets, axes[0], strict=True)}

    def finish(fig: Any, axes: dict[str, Any], legend_title: str, path: Path) -> None:
        for d, ax in axes.items():
            if len(datasets) > 1:
                ax.set_title(d)
        handles = [plt.Line2D([], [], color=colour[m], marker="o", label=m) for m in models]
        fig.legend(handles=handles, title=legend_title, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize="small", title_fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        rep.figures.append(path)

    fig, axes = panels("Tuning budget: best validation metric vs configurations")
    spread = budget_spread(curves)
    for gid, block in curves.groupby("group", sort=True):  # a model on one dataset/axes: its search(es)
        draw_group(axes[str(labels.get(gid, datasets[0]))], block, spread[spread["group"] == gid],
                   colour[str(block["model"].iloc[0])])
    for ax in axes.values():
        ax.set(xlabel="configurations tried", ylabel=f"best full-budget validation {metric} so far")
    finish(fig, axes, "model (solid: as searched,\nx: stopped early;\ndashed: expected best over\nrandom orders ± sd;"
           "\nseveral searches: band =\nrange across searches)", out / "figures" / "tuning_budget.png")
    curves.to_csv(out / "figures" / "tuning_budget.csv", index=False)
    spread.to_csv(out / "figures" / "tuning_budget_spread.csv", index=False)
    fig, axes = panels("Sensitivity to the learning rate")
    for (gid, model), block in sens.groupby(["group", "model"], sort=True):
        ax, c = axes[str(labels.get(gid, datasets[0]))], colour[str(model)]
        full, cut = block[~block["stopped_early"]], block[block["stopped_early"]]
        ax.scatter(full["lr"], full["value"], alpha=0.85, color=c)
        ax.scatter(cut["lr"], cut["value"], marker="x", alpha=0.85, color=c)  # at the epoch ASHA stopped it
    for ax in axes.values():
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation {metric} (tuning runs)")
    finish(fig, axes, "model (x = stopped early)", out / "figures" / "tuning_sensitivity.png")
    sens.to_csv(out / "figures" / "tuning_sensitivity.csv", index=False)
    n_tune = int((df["stage"] == S.STAGE_TUNE).sum())
    stopped = int(df["stopped_early"].notna().sum())
    rep.section = "\n".join([
        "### Tuned comparison (final runs only)", "",
        f"Each model's hyper-parameters were chosen on the validation metric from {n_tune} tuning runs "
        f"({stopped} stopped early by ASHA); the table shows only the final re-runs of the chosen configuration "
        f"over fresh seeds. Tuning runs' test metrics are not shown anywhere.", "", *lines, "",
        f"'at a range edge' names selected values in the outer {EDGE_FRACTION:.0%} of a continuous search range (log "
        "scale for log-uniform), at a randint bound, or the smallest/largest of three or more numeric choices: the "
        "search may have stopped short of that model's best.", "",
        "Figures: figures/tuning_budget.png (best full-budget validation metric vs configurations tried, as the "
        "search ran (solid) and as expected over random orders of the same configurations, drawn without "
        "replacement ± sd (dashed, the unbiased estimator of Tang et al. 2020); failed and early-stopped runs count "
        "as drawn but never best; the dashed line meets the observed best at the last configuration by "
        "construction, so only a second search seed (band: range of the expected best across searches, "
        "figures/tuning_budget_spread.csv) shows what another search would change; under ASHA or a model-based "
        "search the orders are not exchangeable and the dashed line is only indicative), "
        "figures/tuning_sensitivity.png (validation metric vs learning rate, by model).", ""])
    tables, figures, section = write_tuning_plots(df, out)
    rep.tables += tables
    rep.figures += figures
    rep.section += ("\n" + section) if section else ""
    return rep
