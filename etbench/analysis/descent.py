"""Energy-descent figures: E, E_att and E_hn against descent step t, per ablation value.

Input is ``cache.energy_frame``: one row per (run, step, sample) from energy_trace.csv artifacts, or per
(run, step) from the ``energy/*`` metric histories. Bands are 95% CIs of the mean over all samples and
seeds at that step: Student t intervals — a band holds samples × seeds values (tens to thousands), where the t
interval and a bootstrap agree, and thousands of bands would cost a bootstrap each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from scipy import stats

from etbench.analysis import facets, style
from etbench.analysis.figures import STEPS, FigureSet, Sink, axis_label, file_part, value_text, varying
from etbench.analysis.stats import CIConfig, mean_ci

TERMS = ("E", "E_att", "E_hn")
TERM_LABEL = {"E": "E (total)", "E_att": "E_att (attention)", "E_hn": "E_hn (Hopfield)"}
BAND_CI = CIConfig(method="t")


def descent_curves(energy: pd.DataFrame, keys: Sequence[str], cfg: CIConfig = BAND_CI,
                   terms: Sequence[str] = TERMS) -> pd.DataFrame:
    """Mean, CI and n of each energy term (or other per-step column in ``terms``) per (keys, step), over samples
    and seeds.

    With a Student t ``cfg`` (the default) the intervals of all groups are computed at once from the group means,
    standard deviations and counts — the same numbers as ``stats.mean_ci`` per group (tested), without one scipy
    call per band point; any other ``cfg`` goes through ``stats.mean_ci`` group by group.
    """
    groups = energy.groupby([*keys, "step"], dropna=False, sort=True)
    if cfg.method != "t":
        rows = []
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            base = dict(zip([*keys, "step"], key, strict=True))
            rows += [{**base, "term": term, **mean_ci(g[term].to_numpy(float), cfg)} for term in terms]
        return pd.DataFrame(rows)
    parts = []
    for term in terms:
        agg = groups[term].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
        n = agg["n"].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            half = stats.t.ppf((1 + cfg.confidence) / 2, n - 1) * agg["std"].to_numpy(float) / np.sqrt(n)
        reliable = n >= _reliable_n(cfg)
        half = np.where(reliable, half, np.nan)
        agg["ci_low"], agg["ci_high"] = agg["mean"] - half, agg["mean"] + half
        agg.loc[agg["n"] < 2, "std"] = np.nan
        agg["interval"] = np.where(reliable, "t", "none")
        parts.append(agg.reset_index().assign(term=term))
    order = [*keys, "step", "term", "mean", "std", "n", "ci_low", "ci_high", "interval"]
    out = pd.concat(parts, ignore_index=True)
    out["n"] = out["n"].astype(int)
    return out[order].sort_values([*keys, "step"], kind="stable").reset_index(drop=True)


def _reliable_n(cfg: CIConfig) -> int:
    """Smallest n with an interval under ``cfg`` (``stats.CIConfig.method_for``; 2 for configs without it)."""
    method_for = getattr(cfg, "method_for", None)
    if method_for is None:
        return 2
    return next(n for n in range(2, 1000) if method_for(n) != "none")


def _over_text(block: pd.DataFrame) -> str:
    sources = set(block["source"].unique())  # not set(column): that iterates every row in Python
    over = "samples and seeds" if sources == {"trace"} else "seeds" if sources == {"metrics"} else \
        "samples and seeds (trace) or seeds (energy/* metrics)"
    if "split" in block.columns and block.loc[block["split"] != -1, "split"].nunique() > 1:
        over += " and splits"
    return over


def energy_figures(energy: pd.DataFrame, axes: Sequence[str], cfg: CIConfig = BAND_CI,
                   sink: Sink | None = None) -> FigureSet:
    """Per (dataset, protocol, model): one 3-panel figure (E, E_att, E_hn) with one line per ablation cell, or —
    beyond ``facets.LINES_PER_PANEL`` cells — pages of small multiples of E (:func:`_energy_pages`). The curves
    of every cell and term are kept as a table (``FigureSet.tables``)."""
    out = FigureSet(sink=sink)
    if energy.empty:
        out.skipped.append("energy descent: no run has an energy_trace.csv artifact or energy/* metrics")
        return out
    for (dataset, protocol, model), block in energy.groupby(["dataset", "protocol", "model"], sort=True):
        ablate = varying(block, [a for a in axes if a in block.columns])
        curves = descent_curves(block, ablate, cfg)
        curves = curves[curves["n"] > 0]
        out.tables.append((f"energy_descent_{dataset}_{protocol}_{model}", curves))
        n_cells = len(curves[ablate].drop_duplicates()) if ablate else 1
        if n_cells > facets.LINES_PER_PANEL:
            _energy_pages(out, block, ablate, str(dataset), str(protocol), str(model), cfg)
            continue
        if ablate:
            curves = curves.assign(cell=curves[ablate].map(value_text).agg(", ".join, axis=1))
            legend_title = ", ".join(axis_label(a, ablate) for a in ablate)
        else:
            curves = curves.assign(cell=model)
            legend_title = None
        cells = list(dict.fromkeys(curves.sort_values(ablate or ["step"])["cell"]))
        colours = dict(zip(cells, sns.color_palette("viridis", len(cells)) if ablate else
                           [style.model_palette([model])[model]], strict=True))
        rises = rise_points(block, ablate)
        if not rises.empty:
            out.tables.append((f"energy_rises_{dataset}_{protocol}_{model}", rises))
        fig, axs = style.new_figure(ncols=3, width=style.DOUBLE_COLUMN_IN, height=0.32 * style.DOUBLE_COLUMN_IN)
        for ax, term in zip(axs[0], TERMS, strict=True):
            part = curves[curves["term"] == term]
            for cell in cells:
                _curve(ax, part[part["cell"] == cell], colours[cell], cell)
            if term == "E":
                _mark_rises(ax, part, rises, ablate)
            ax.set_title(TERM_LABEL[term])
            ax.set_xlabel("descent step t")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        axs[0, 0].set_ylabel("energy")
        handles, labels = facets.distinct_legend(axs[0])
        fig.suptitle("\n".join(line for line in (
            f"{model} · {dataset} / {protocol}: mean, 95% CI (Student t) over {_over_text(block)}",
            rise_text(block, rises)) if line))
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)), frameon=False,
                       title=legend_title)
        out.add(f"energy_{dataset}_{protocol}_{model}", fig)
    return out


RISE_LABEL = "E rose (in some sample)"


def rise_points(block: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Updates t → t+1 (per keys) where E rose in at least one traced sample, with the share of traced (sample,
    seed) rows that rose — read from the traces' own ``rose`` flags (``EnergyTrace.rose``: row t flags update
    t → t+1), not re-judged here. Columns: keys, update (= t), step (= t+1, where the raised E is drawn), share, n."""
    cols = [*keys, "update", "step", "share", "n"]
    if "rose" not in block.columns or block["rose"].notna().sum() == 0:
        return pd.DataFrame(columns=cols)
    last = block.groupby("run_id")["step"].transform("max") if "run_id" in block.columns else block["step"].max()
    known = block[block["rose"].notna() & (block["step"] < last)]  # the last row has no update after it
    agg = known.groupby([*keys, "step"], dropna=False, sort=True)["rose"].agg(["mean", "count"]).reset_index()
    agg = agg.rename(columns={"mean": "share", "count": "n", "step": "update"}).assign(step=lambda t: t["update"] + 1)
    return agg[agg["share"] > 0][cols].reset_index(drop=True)


def rise_text(block: pd.DataFrame, rises: pd.DataFrame) -> str:
    """Title line: where E rose, that it never did, or "" when no trace recorded rises."""
    if "rose" not in block.columns or block["rose"].notna().sum() == 0:
        return ""
    if rises.empty:
        return "E never rose in the traced samples"
    return f"E rose on {len(rises)} update(s) (▼ where it ended higher; up to {rises['share'].max():.0%} of samples)"


def _mark_rises(ax: Any, curve: pd.DataFrame, rises: pd.DataFrame, keys: Sequence[str]) -> None:
    """▼ on the mean-E curve at the end of every update on which E rose in some sample of that cell."""
    if rises.empty or curve.empty:
        return
    on = [*keys, "step"]
    hit = curve.merge(rises[on], on=on, how="inner")
    if not hit.empty:
        ax.scatter(hit["step"], hit["mean"], marker="v", s=28, color="crimson", zorder=5, label=RISE_LABEL)


def _curve(ax: Any, g: pd.DataFrame, colour: Any, label: str) -> None:
    g = g.sort_values("step")
    if g["mean"].notna().sum() == 0:
        return
    ax.plot(g["step"], g["mean"], color=colour, label=label, marker=".")
    ax.fill_between(g["step"].to_numpy(float), g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float),
                    color=colour, alpha=0.2, linewidth=0)


def _energy_pages(out: FigureSet, block: pd.DataFrame, ablate: list[str], dataset: str, protocol: str, model: str,
                  cfg: CIConfig) -> None:
    """Many cells: E (total) only; panels = steps T (else the axis with the fewest values), lines = the axis
    with the most values (at most LINES_PER_PANEL per page), the other axes pooled into the band."""
    panel = STEPS if STEPS in ablate and len(ablate) > 1 else (
        min(ablate, key=lambda a: block[a].nunique()) if len(ablate) > 1 else None)
    others = [a for a in ablate if a != panel]
    line = max(others, key=lambda a: block[a].nunique())
    pooled = [a for a in others if a != line]
    keys = [a for a in (panel, line) if a is not None]
    curves = descent_curves(block, keys, cfg)
    curves = curves[(curves["n"] > 0) & (curves["term"] == "E")]
    rises = rise_points(block, keys)
    if not rises.empty:
        out.tables.append((f"energy_rises_{dataset}_{protocol}_{model}", rises))
    values = sorted(curves[line].dropna().unique())
    panel_values = sorted(curves[panel].dropna().unique()) if panel is not None else [None]
    line_label = axis_label(line, ablate)
    pages = facets.chunks(panel_values, facets.PANELS_PER_PAGE)
    for chunk in facets.chunks(values, facets.LINES_PER_PANEL):
        colours = facets.value_colours(chunk)
        for page, group in enumerate(pages):
            fig, axs = facets.page_figure(len(group), legend_entries=len(chunk))
            for ax, pv in zip(axs, group, strict=True):
                part = curves if panel is None else curves[curves[panel] == pv]
                for v in chunk:
                    _curve(ax, part[part[line] == v], colours[v], value_text(v))
                _mark_rises(ax, part[part[line].isin(chunk)], rises, keys)
                ax.set_title("all cells" if panel is None else f"{axis_label(panel, ablate)}={value_text(pv)}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            pool = f"; pooled over {', '.join(axis_label(a, ablate) for a in pooled)}" if pooled else ""
            page_text = f"; page {page + 1} of {len(pages)}" if len(pages) > 1 else ""
            span = f"{value_text(chunk[0])}–{value_text(chunk[-1])}"
            title = "\n".join([f"{model} · {dataset} / {protocol}: E (total) vs descent step t",
                               f"lines: {line_label} {span}{pool}{page_text}",
                               f"mean, 95% CI (Student t) over {_over_text(block)}; "
                               f"every term per cell: energy_descent_*.csv", *filter(None, [rise_text(block, rises)])])
            facets.finish_page(fig, axs, title, xlabel="descent step t", ylabel="energy E", legend_title=line_label)
            name = (f"energy_{dataset}_{protocol}_{model}_{file_part(line_label)}-{file_part(value_text(chunk[0]))}"
                    f"to{file_part(value_text(chunk[-1]))}{facets.page_suffix(page, len(pages))}")
            out.add(name, fig)
