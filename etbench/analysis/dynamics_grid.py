"""The report of ``etbench dynamics --grid … --report DIR``: from the combined probe tables alone (``dynamics_grid.csv``
and ``dynamics_grid_curves.csv``), per training T —

* ``dynamics_grid_metric``: the headline test metric against the test-time step count T' for every arm (the ET at
  each trained α, ``vit-tied``), the mean over seeds thick, every seed thin, the training T marked;
* ``dynamics_grid_curves``: along the longest probed descent, E(x_t) − E(x_0), the token-mean ‖∂E/∂g‖ and the
  relative update ‖Δx‖/‖x‖ against the step t (means over the test images, then over seeds);
* ``dynamics_grid_table.md`` / ``.csv``: per arm and training T the metric at T' = 0, T' = T and the longest T', its
  change beyond T, the best T', the share of updates where E rose and the fixed-point step, with the config hashes;
  ``dynamics_grid_runs.csv``: the same per run (one row per config hash).

Only rows at α'/α = 1 are drawn and tabulated (the trained step size; other scales stay in the CSV).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import ticker
from matplotlib.axes import Axes

from etbench.analysis import style
from etbench.analysis.dynamics import headline
from etbench.analysis.metrics import short_name
from etbench.errors import EtbenchError

PREFIX = "dynamics_grid"


class GridReportError(EtbenchError, ValueError):
    """The probe tables cannot be reported (missing, empty, or not from ``etbench dynamics --grid``)."""


def arm(model: str, alpha: float) -> str:
    """The label of a trained configuration: ``ET α=0.05`` or the model name (vit-tied has no α)."""
    return f"ET α={alpha:g}" if model == "et" and not math.isnan(alpha) else model


def load(csv_path: Path) -> pd.DataFrame:
    """A combined probe table at α'/α = 1 with an ``arm`` column; errors name the file and what is missing."""
    if not Path(csv_path).is_file():
        raise GridReportError(f"{csv_path}: no such probe table (run etbench dynamics --grid … --out DIR first)")
    table = pd.read_csv(csv_path, dtype={"config_hash": str})
    need = ["config_hash", "model", "train_steps", "train_alpha", "seed", "eval_steps", "alpha_scale"]
    if missing := [c for c in need if c not in table.columns]:
        raise GridReportError(f"{csv_path}: not an etbench dynamics --grid table, lacks column(s) {missing}")
    table = table[np.isclose(table["alpha_scale"].astype(float), 1.0)].copy()
    if table.empty:
        raise GridReportError(f"{csv_path}: no probed run at α'/α = 1 yet (nothing FINISHED, or not probed)")
    table["arm"] = [arm(m, a) for m, a in zip(table["model"], table["train_alpha"].astype(float), strict=True)]
    return table


def _arms(table: pd.DataFrame) -> list[str]:
    """ET arms by α (descending), then the other models."""
    ets = sorted({a for a in table["arm"] if a.startswith("ET ")}, key=lambda a: -float(a.split("=")[1]))
    return ets + sorted({a for a in table["arm"] if not a.startswith("ET ")})


def _palette(arms: list[str]) -> dict[str, tuple[float, float, float]]:
    """ET arms in blues (darker = larger α), other models in their usual colours."""
    ets = [a for a in arms if a.startswith("ET ")]
    blues = sns.color_palette("Blues", len(ets) + 2)[:1:-1][: len(ets)]
    other = style.model_palette([a for a in arms if a not in ets])
    return {**dict(zip(ets, blues, strict=True)), **other}


def _plain_log_y(ax: Axes) -> None:
    """Log y with plain major labels and no minor labels (they crowd a small panel)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, numticks=4))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))


def metric_figure(table: pd.DataFrame, out: Path) -> list[Path]:
    """Headline metric vs T', one panel per training T (see the module docstring)."""
    metric = headline(table)
    trained = sorted(table["train_steps"].unique())
    arms = _arms(table)
    colours = _palette(arms)
    fig, axs = style.new_figure(ncols=len(trained), width=style.DOUBLE_COLUMN_IN, height=0.36 * style.DOUBLE_COLUMN_IN,
                                sharey=True)
    for ax, t_train in zip(axs[0], trained, strict=True):
        here = table[table["train_steps"] == t_train]
        for a in arms:
            g = here[here["arm"] == a]
            if g.empty:
                continue
            for _, seed in g.groupby("seed"):
                s = seed.sort_values("eval_steps")
                ax.plot(s["eval_steps"], s[metric], color=colours[a], alpha=0.35, lw=0.6)
            mean = g.groupby("eval_steps")[metric].mean()
            ax.plot(mean.index, mean.values, color=colours[a], marker="o", ms=2.5, lw=1.4, label=a)
        ax.axvline(t_train, color="0.4", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1)
        probed = sorted(here["eval_steps"].unique())
        ax.xaxis.set_major_locator(ticker.FixedLocator([t for t in probed if t in (0, 1, 4, 16, 96)] or probed))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(f"trained with T = {t_train}")
        ax.set_xlabel("test-time steps T'")
    axs[0, 0].set_ylabel(short_name(metric))
    handles = {lab: h for ax in axs[0] for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(6, len(handles)),
               frameon=False)
    fig.suptitle(f"{short_name(metric)} vs test-time steps (thick: mean over seeds, thin: each seed; "
                 f"dashed: the training T)")
    return style.save(fig, out / f"{PREFIX}_metric")


CURVE_PANELS = (("energy_change", "E(x_t) − E(x_0)", False), ("grad_norm", "‖∂E/∂g‖", True),
                ("rel_update", "‖Δx‖/‖x‖", True))


def curves_figure(curves: pd.DataFrame, out: Path) -> list[Path]:
    """Per-step E change, gradient norm and relative update along the longest probed descent (rows) per training
    T (columns); the mean over seeds of the test-image means."""
    curves = curves[np.isclose(curves["alpha_scale"].astype(float), 1.0)]
    curves = curves[curves["eval_steps"] == curves["eval_steps"].max()].copy()  # the longest descent only
    curves["arm"] = [arm(m, a) for m, a in zip(curves["model"], curves["train_alpha"].astype(float), strict=True)]
    start = curves[curves["step"] == 0].set_index("config_hash")["energy"]
    curves["energy_change"] = curves["energy"] - curves["config_hash"].map(start)
    trained = sorted(curves["train_steps"].unique())
    arms = _arms(curves)
    colours = _palette(arms)
    fig, axs = style.new_figure(ncols=len(trained), nrows=len(CURVE_PANELS), width=style.DOUBLE_COLUMN_IN,
                                height=0.62 * style.DOUBLE_COLUMN_IN, sharex=True, sharey="row")
    for j, t_train in enumerate(trained):
        here = curves[curves["train_steps"] == t_train]
        for i, (col, label, log) in enumerate(CURVE_PANELS):
            ax = axs[i, j]
            for a in arms:
                g = here[(here["arm"] == a) & here[col].notna()]
                if g.empty:
                    continue
                mean = g.groupby("step")[col].mean()
                ax.plot(mean.index, mean.values, color=colours[a], lw=1.2, label=a)
            ax.axvline(t_train, color="0.4", ls="--", lw=0.8)
            values = curves[col].dropna()
            if log and not values.empty and (values > 0).all() and values.max() >= 10 * values.min():
                _plain_log_y(ax)
            if j == 0:
                ax.set_ylabel(label)
            if i == 0:
                ax.set_title(f"trained with T = {t_train}")
            if i == len(CURVE_PANELS) - 1:
                ax.set_xlabel("step t")
    handles = {lab: h for ax in axs.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(6, len(handles)),
               frameon=False)
    longest = int(curves["eval_steps"].max()) if not curves.empty else 0
    fig.suptitle(f"along the test-time descent T' = {longest}: energy change, token-mean ‖∂E/∂g‖ at x_t, relative "
                 f"update of step t\n(means over test images and seeds; dashed: the training T)")
    return style.save(fig, out / f"{PREFIX}_curves")


def run_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per probed run: metric at T' = 0, T' = training T, the longest T', best T' and dynamics at the
    longest T'."""
    metric = headline(table)
    longest = int(table["eval_steps"].max())
    rows = []
    for h, g in table.groupby("config_hash", sort=False):
        by = g.set_index("eval_steps")
        t = int(g["train_steps"].iloc[0])
        ref = next((k for k in sorted(by.index) if k >= t), t)  # T itself, else the next probed T'
        at = {k: float(by[metric].get(k, math.nan)) for k in (0, longest)}
        at[t] = float(by[metric].get(ref, math.nan))
        best = by[metric].idxmin() if metric.endswith(("mse", "mse_masked", "loss")) else by[metric].idxmax()
        last = by.loc[longest] if longest in by.index else None
        full = f"recorded_{metric}"
        rows.append({"arm": g["arm"].iloc[0], "train_steps": t, "seed": int(g["seed"].iloc[0]), "config_hash": h,
                     "test_images": int(g["test_images"].iloc[0]) if "test_images" in g else -1,
                     "recorded_full_test": float(g[full].iloc[0]) if full in g else math.nan,
                     "at_0": at[0], "train_ref_steps": int(ref), "at_train": at[t], "at_longest": at[longest],
                     "change_beyond_train": at[longest] - at[t], "best_eval_steps": int(best),
                     "best": float(by[metric].loc[best]),
                     "rose_fraction": float(last["rose_fraction"]) if last is not None else math.nan,
                     "fixed_point_step": last["fixed_point_step"] if last is not None else math.nan})
    return pd.DataFrame(rows)


def _fmt(values: pd.Series, digits: int = 4) -> str:
    """Mean (min … max over seeds) of a column; '—' when all NaN."""
    v = values.dropna().astype(float)
    if v.empty:
        return "—"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f} … {v.max():.{digits}f})"


def summary_table(runs: pd.DataFrame, metric: str, longest: int) -> tuple[pd.DataFrame, str]:
    """Per arm and training T: the run table's columns as mean (min … max over seeds), and its markdown."""
    order = {a: i for i, a in enumerate(_arms(runs))}
    groups = sorted(runs.groupby(["arm", "train_steps"]), key=lambda kv: (kv[0][1], order[kv[0][0]]))
    rows, lines = [], []
    name = short_name(metric)
    lines.append(f"| training T | arm | seeds | recorded, whole test split, T' = T | {name} at T' = 0 | at T' = T* | "
                 f"at T' = {longest} | change T* → {longest} | best T' (per seed) | E rose (share of updates, "
                 f"T' = {longest}) | fixed-point step (per seed) | config hashes |")
    lines.append("|---" * 12 + "|")
    for (a, t), g in groups:
        fixed = ", ".join("never" if (isinstance(f, float) and math.isnan(f)) or f == "" else str(int(float(f)))
                          for f in g["fixed_point_step"])
        best = ", ".join(str(b) for b in g["best_eval_steps"])
        hashes = ", ".join(g["config_hash"])
        rows.append({"train_steps": t, "arm": a, "seeds": len(g), **{c: g[c].mean() for c in (
            "recorded_full_test", "at_0", "at_train", "at_longest", "change_beyond_train", "rose_fraction")},
            "best_eval_steps": best, "fixed_point_step": fixed, "config_hashes": hashes})
        change = g["change_beyond_train"]
        ref = int(g["train_ref_steps"].iloc[0])
        label = f"{t}" if ref == t else f"{t} (T* = {ref})"
        lines.append(f"| {label} | {a} | {len(g)} | {_fmt(g['recorded_full_test'])} | {_fmt(g['at_0'])} "
                     f"| {_fmt(g['at_train'])} | {_fmt(g['at_longest'])} "
                     f"| {'+' if change.mean() > 0 else ''}{_fmt(change)} | {best} | {_fmt(g['rose_fraction'], 3)} "
                     f"| {fixed} | {hashes} |")
    return pd.DataFrame(rows), "\n".join(lines) + "\n"


def grid_report(csv_path: Path, curves_path: Path, out: Path) -> list[Path]:
    """Write the report's figures and tables into ``out``; returns the paths written."""
    table = load(csv_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = headline(table)
    longest = int(table["eval_steps"].max())
    runs = run_table(table)
    summary, markdown = summary_table(runs, metric, longest)
    paths = [out / f"{PREFIX}_runs.csv", out / f"{PREFIX}_table.csv", out / f"{PREFIX}_table.md"]
    runs.to_csv(paths[0], index=False)
    summary.to_csv(paths[1], index=False)
    images = sorted(set(runs["test_images"]))
    paths[2].write_text(f"{short_name(metric)} at α'/α = 1, mean (min … max) over seeds; probed on the first "
                        f"{', '.join(map(str, images))} test images (under their fixed masks), the recorded column on "
                        f"the whole test split. T*: the training T, or the next probed T' where T was not "
                        f"probed\n\n" + markdown)
    paths += metric_figure(table, out)
    if Path(curves_path).is_file():
        curves = pd.read_csv(curves_path, dtype={"config_hash": str})
        if not curves.empty:
            paths += curves_figure(curves, out)
    return paths
