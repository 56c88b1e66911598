"""Result figures from run summaries: metric vs steps T, per energy-term variant, memory × steps heatmap, and
metric vs cost (Pareto view). Every function returns the figures it could draw (name, Figure) and a message for
each one it skipped because the grid lacks the data; it never raises for an absent axis.

Graph runs with several stored splits are summarised over splits (each split the mean over its seeds); all
other runs over seeds. The same rule labels each figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from etbench.analysis import facets, style
from etbench.analysis.metrics import COST_COLUMNS, column, higher_is_better, short_name
from etbench.analysis.stats import DEFAULT_CI, CIConfig
from etbench.analysis.summary_cache import cached_summarize
from etbench.analysis.tables import fmt_mean_ci

STEPS = "axis.model.steps"
#: Heatmaps: at most this many T columns in a single-column figure; cell labels ("mean ± half") only while a
#: cell is at least this wide (inches) and there are at most this many rows — beyond, colour alone.
HEATMAP_COLUMNS_SINGLE = 5
ANNOTATE_MIN_W_IN = 0.33
ANNOTATE_MAX_ROWS = 16
TERMS = "axis.model.terms"
MEMORY = ("axis.model.memories", "axis.model.mem_ratio")


#: Receives each figure as soon as it is drawn (the report saves and closes it, so few figures are open at once).
Sink = Callable[[str, Figure], None]


@dataclass
class FigureSet:
    """Figures drawn (file stem, figure) and why others were skipped. With a ``sink`` each figure goes to the
    sink when added and only its name is kept (``names``)."""

    made: list[tuple[str, Figure]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sink: Sink | None = None
    names: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # data behind figures, saved as CSV

    def add(self, name: str, fig: Figure) -> None:
        self.names.append(name)
        if self.sink is not None:
            self.sink(name, fig)
        else:
            self.made.append((name, fig))

    def extend(self, other: FigureSet) -> None:
        self.made += other.made
        self.names += other.names
        self.tables += other.tables
        self.skipped += other.skipped


def summary_over(block: pd.DataFrame) -> str:
    """"split" when the block has several stored splits (graph protocols), else "seed"."""
    splits = block["split"].dropna()
    return "split" if splits[splits != -1].nunique() > 1 else "seed"


def metric_label(metric: str) -> str:
    return f"{short_name(metric)} ({'↑' if higher_is_better(metric) else '↓'})"


def varying(block: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """Axes with more than one value in ``block``."""
    return [a for a in axes if block[a].dropna().nunique() > 1]


def axis_label(axis: str, among: Sequence[str] = ()) -> str:
    """Short name of an axis column (``axis.model.steps`` → ``steps``); the longer dotted name when another axis
    in ``among`` has the same last part (``train.steps`` beside ``model.steps``)."""
    leaf = axis.rsplit(".", 1)[-1]
    if sum(a.rsplit(".", 1)[-1] == leaf for a in among) > 1:
        return axis.removeprefix("axis.")
    return leaf


def value_text(value: object) -> str:
    """An axis value as titles and file names print it: floats in their shortest exact form (0.0005, 1e-05)."""
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def rest_label(values: dict[str, object]) -> str:
    """"name=value" of the other varying axes, for a title."""
    return ", ".join(f"{axis_label(a, list(values))}={value_text(v)}" for a, v in values.items())


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+=-")


def file_part(text: str) -> str:
    """``text`` safe for a file name and still distinct: every other character is percent-encoded (%2F for /)."""
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in text)


def _summary(block: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig) -> tuple[pd.DataFrame, str]:
    over = summary_over(block)
    table = cached_summarize(block, metric, axes, over=over, cfg=cfg, complete=False)
    return table[table["n"] > 0], over



def _page_title_and_name(kind: str, head: str, role: str, label: str, chunk: list[Any], panels: list[str],
                         page: int, pages: int, summary: str, tag: str) -> tuple[str, str]:
    """A small-multiples page's title (what varies along lines/series, panels, page k of n) and its file name,
    which keeps the range of the page's ``label`` values and the page number."""
    span = f"{value_text(chunk[0])}–{value_text(chunk[-1])}" if chunk else "–"
    extra = [t for t in (f"panels: {', '.join(panels)}" if panels else "",
                         f"page {page + 1} of {pages}" if pages > 1 else "") if t]
    title = "\n".join([head, f"{role}: {label} {span}" + "".join(f"; {t}" for t in extra), summary])
    name = (f"{kind}_{tag}_{file_part(label)}-{file_part(value_text(chunk[0]))}to{file_part(value_text(chunk[-1]))}"
            f"{facets.page_suffix(page, pages)}")
    return title, name

def _tag(dataset: str, protocol: str, metric: str) -> str:
    return f"{dataset}_{protocol}_{metric.rsplit('/', 1)[-1]}"


def slice_combos(table: pd.DataFrame, rest: Sequence[str]) -> pd.DataFrame:
    """The distinct combinations of the ``rest`` axes that define slices.

    A missing value (a baseline without an ET-only axis) is a wildcard: such a row joins every slice it matches
    on its other axes, so it defines a slice of its own only when it matches none.
    """
    combos = table[list(rest)].dropna(how="all").drop_duplicates()
    width = combos.notna().sum(axis=1).to_numpy()
    keep = []
    for i, (_, combo) in enumerate(combos.iterrows()):
        covered = width > width[i]
        for a in rest:
            if pd.notna(combo[a]):
                covered &= (combos[a].notna() & (combos[a] == combo[a])).fillna(False).to_numpy(bool)
        if not covered.any():
            keep.append(i)
    combos = combos.iloc[keep]
    return combos.sort_values(list(rest), na_position="last").reset_index(drop=True)


def _slices(table: pd.DataFrame, rest: Sequence[str]) -> list[tuple[dict[str, object], pd.DataFrame]]:
    """One slice per combination of the ``rest`` axes (:func:`slice_combos`): the rows with exactly those values,
    plus the rows that have no value for an axis fixed here (a baseline without that ET-only axis)."""
    if not rest:
        return [({}, table)]
    out = []
    # records, not iterrows: a row Series of an int and a float axis would turn steps=1 into 1.0 (title, file name)
    for combo in slice_combos(table, rest).to_dict("records"):
        mask = np.ones(len(table), dtype=bool)
        for a in rest:
            has = table[a].isna() | (table[a] == combo[a]) if pd.notna(combo[a]) else table[a].isna()
            mask &= has.to_numpy(bool)
        out.append(({a: combo[a] for a in rest if pd.notna(combo[a])}, table[mask]))
    return out


INTERVAL_NAMES = {"t": "Student t", "BCa": "BCa bootstrap", "percentile": "percentile bootstrap",
                  "basic": "basic bootstrap"}


def ci_words(table: pd.DataFrame, confidence: float = DEFAULT_CI.confidence) -> str:
    """"95% CI (Student t; none at n < 3)": the interval methods the plotted summaries actually used."""
    used = list(dict.fromkeys(table["interval"].dropna())) if "interval" in table.columns else []
    names = [INTERVAL_NAMES.get(str(m), str(m)) for m in used if m != "none"]
    if "none" in used:
        names.append(f"none at n < {DEFAULT_CI.reliable_min_n}")
    return f"{confidence:.0%} CI ({'; '.join(names)})" if names else f"{confidence:.0%} CI"


def _title(fig: Figure, dataset: str, protocol: str, fixed: dict[str, object], over: str, note: str = "",
           ci: str = "95% CI") -> None:
    lines = [f"{dataset} / {protocol}", rest_label(fixed), f"mean, {ci} over {over}s{note}"]
    fig.suptitle("\n".join(line for line in lines if line))


def _suffix(fixed: dict[str, object]) -> str:
    """File-name part naming every fixed axis value exactly (the title shows the same values)."""
    return "".join(f"_{file_part(axis_label(a, list(fixed)))}-{file_part(value_text(v))}" for a, v in fixed.items())


def steps_figures(runs: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig = DEFAULT_CI,
                  sink: Sink | None = None) -> FigureSet:
    """Metric vs steps T, one line per model with its 95% CI band; one figure per value of the other axes, or —
    beyond ``facets.SEPARATE_MAX`` such values — pages of small multiples (:func:`_steps_pages`)."""
    out = FigureSet(sink=sink)
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        if STEPS not in axes or block[STEPS].dropna().nunique() < 2:
            out.skipped.append(f"steps: {dataset}/{protocol} has no '{STEPS}' axis with ≥ 2 values")
            continue
        present = [a for a in axes if block[a].notna().any()]
        table, over = _summary(block, metric, present, cfg)
        table = table[table[STEPS].notna()]
        rest = [a for a in varying(block, present) if a != STEPS]
        slices = _slices(table, rest)
        if len(slices) > facets.SEPARATE_MAX:
            _steps_pages(out, table, rest, str(dataset), str(protocol), metric, over)
            continue
        for fixed, part in slices:
            fig, ax = style.new_figure()
            ax = ax[0, 0]
            palette = style.model_palette(part["model"])
            for model in style.model_order(part["model"].unique()):
                g = part[part["model"] == model].sort_values(STEPS)
                _band_line(ax, g, palette[model], model)
            ax.set_xlabel("steps T")
            ax.set_ylabel(metric_label(metric))
            facets.ticks_for(ax, part[STEPS].astype(float))
            _title(fig, dataset, protocol, fixed, over, ci=ci_words(part))
            _legend_below(fig, ax)
            out.add(f"steps_{_tag(dataset, protocol, metric)}{_suffix(fixed)}", fig)
    return out


def _band_line(ax: Any, g: pd.DataFrame, colour: Any, label: str, marker: str = "o") -> None:
    """Mean vs T with its CI band."""
    x = g[STEPS].astype(float).to_numpy()
    ax.plot(x, g["mean"].astype(float), marker=marker, color=colour, label=label)
    ax.fill_between(x, g["ci_low"].astype(float), g["ci_high"].astype(float), color=colour, alpha=0.18, linewidth=0)


MARKERS = ("o", "s", "^", "D", "v", "P")
#: Pareto panels with more cells than this draw small, see-through points without caps, so the front stays visible.
PARETO_DENSE_POINTS = 60


def _steps_pages(out: FigureSet, table: pd.DataFrame, rest: list[str], dataset: str, protocol: str, metric: str,
                 over: str) -> None:
    """Many slices: the axis with the most values becomes the lines (coloured by value, at most
    ``LINES_PER_PANEL`` per panel together with the baselines, which lack it), the other axes the panels; pages
    split both. File names carry the line values' range and the page."""
    line_axis = max(rest, key=lambda a: table[a].dropna().nunique())
    panel_axes = [a for a in rest if a != line_axis]
    panels = _slices(table, panel_axes)
    values = sorted(table[line_axis].dropna().unique())
    models = style.model_order(table["model"].unique())
    with_axis = [m for m in models if table.loc[table["model"] == m, line_axis].notna().any()]
    baselines = [m for m in models if m not in with_axis]
    per_chunk = max(1, (facets.LINES_PER_PANEL - len(baselines)) // max(1, len(with_axis)))
    line_chunks, panel_pages = facets.chunks(values, per_chunk), facets.chunks(panels, facets.PANELS_PER_PAGE)
    palette = style.model_palette(models)
    label = axis_label(line_axis, rest)
    for chunk in line_chunks:
        colours = facets.value_colours(chunk)
        for page, group in enumerate(panel_pages):
            entries = len(baselines) + len(with_axis) * len(chunk)
            fig, axs = facets.page_figure(len(group), legend_entries=entries)
            for ax, (fixed, part) in zip(axs, group, strict=True):
                for model in baselines:
                    g = part[(part["model"] == model) & part[line_axis].isna()].sort_values(STEPS)
                    _band_line(ax, g, palette[model], model, marker="x")
                for k, model in enumerate(with_axis):
                    for v in chunk:
                        g = part[(part["model"] == model) & (part[line_axis] == v)].sort_values(STEPS)
                        _band_line(ax, g, colours[v], f"{model} {label}={value_text(v)}", MARKERS[k % len(MARKERS)])
                ax.set_title(rest_label(fixed) or "all cells")
                facets.ticks_for(ax, part[STEPS].astype(float))
            title, name = _page_title_and_name(
                "steps", f"{dataset} / {protocol}: {metric_label(metric)} vs steps T", "lines", label, chunk,
                [axis_label(a, rest) for a in panel_axes], page, len(panel_pages), f"mean, {ci_words(table)} over "
                f"{over}s", _tag(dataset, protocol, metric))
            facets.finish_page(fig, axs, title, xlabel="steps T", ylabel=metric_label(metric), legend_title=None)
            out.add(name, fig)


def _legend_below(fig: Any, ax: Any) -> None:
    """One figure-level legend under the axes, at most five entries per row."""
    fig.legend(loc="outside lower center", ncols=min(5, len(ax.get_legend_handles_labels()[1])), frameon=False)


def terms_figures(runs: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig = DEFAULT_CI,
                  sink: Sink | None = None) -> FigureSet:
    """Metric per energy-term variant (attn+hn / attn / hn) with 95% CI bars; one figure per value of the other
    axes, or — beyond ``facets.SEPARATE_MAX`` such values — pages of small multiples (:func:`_terms_pages`)."""
    out = FigureSet(sink=sink)
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        if TERMS not in axes or block[TERMS].dropna().nunique() < 2:
            out.skipped.append(f"terms: {dataset}/{protocol} has no '{TERMS}' axis with ≥ 2 values")
            continue
        block = block[block[TERMS].notna()]
        present = [a for a in axes if block[a].notna().any()]
        table, over = _summary(block, metric, present, cfg)
        rest = [a for a in varying(block, present) if a != TERMS]
        values = set(table[TERMS])
        order = [t for t in style.TERMS_ORDER if t in values] + sorted(values - set(style.TERMS_ORDER))
        slices = _slices(table, rest)
        if len(slices) > facets.SEPARATE_MAX:
            _terms_pages(out, table, rest, order, str(dataset), str(protocol), metric, over)
            continue
        for fixed, part in slices:
            part = part.assign(x=part[TERMS].map({t: i for i, t in enumerate(order)}))
            fig, ax = style.new_figure()
            ax = ax[0, 0]
            models = style.model_order(part["model"].unique())
            palette = style.model_palette(models)
            width = 0.5 / max(1, len(models))
            for i, model in enumerate(models):
                g = part[part["model"] == model].sort_values("x")
                err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]).astype(float)
                ax.errorbar(g["x"] + (i - (len(models) - 1) / 2) * width, g["mean"], yerr=np.nan_to_num(err),
                            fmt="o", color=palette[model], capsize=2, label=model)
            ax.set_xticks(range(len(order)), order)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel("energy terms")
            ax.set_ylabel(metric_label(metric))
            _title(fig, dataset, protocol, fixed, over, ci=ci_words(part))
            if len(models) > 1:
                _legend_below(fig, ax)
            out.add(f"terms_{_tag(dataset, protocol, metric)}{_suffix(fixed)}", fig)
    return out


def _terms_pages(out: FigureSet, table: pd.DataFrame, rest: list[str], order: list[str], dataset: str,
                 protocol: str, metric: str, over: str) -> None:
    """Many slices, paged like :func:`_steps_pages`: the axis with the most values becomes the series (one
    colour per value, side by side at each energy-term variant, at most ``LINES_PER_PANEL`` per panel over all
    models), the other axes the panels (at most ``PANELS_PER_PAGE`` per page). File names carry the series
    values' range and the page."""
    line_axis = max(rest, key=lambda a: table[a].dropna().nunique())
    panel_axes = [a for a in rest if a != line_axis]
    panels = _slices(table, panel_axes)
    values = sorted(table[line_axis].dropna().unique())
    models = style.model_order(table["model"].unique())
    per_chunk = max(1, facets.LINES_PER_PANEL // max(1, len(models)))
    line_chunks, panel_pages = facets.chunks(values, per_chunk), facets.chunks(panels, facets.PANELS_PER_PAGE)
    label = axis_label(line_axis, rest)
    position = {t: i for i, t in enumerate(order)}
    for chunk in line_chunks:
        colours = facets.value_colours(chunk)
        series = [(model, v) for model in models for v in chunk]
        width = 0.7 / max(1, len(series))
        for page, group in enumerate(panel_pages):
            fig, axs = facets.page_figure(len(group), legend_entries=len(series))
            for ax, (fixed, part) in zip(axs, group, strict=True):
                for k, (model, v) in enumerate(series):
                    g = part[(part["model"] == model) & (part[line_axis] == v)]
                    if g.empty:  # this panel has no cell of that value
                        continue
                    g = g.assign(x=g[TERMS].map(position).astype(float)).sort_values("x")
                    err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]).astype(float)
                    ax.errorbar(g["x"] + (k - (len(series) - 1) / 2) * width, g["mean"], yerr=np.nan_to_num(err),
                                fmt=MARKERS[models.index(model) % len(MARKERS)], color=colours[v], capsize=1.5,
                                markersize=2.5, label=f"{model} {label}={value_text(v)}")
                ax.set_xticks(range(len(order)), order)
                ax.set_xlim(-0.5, len(order) - 0.5)
                ax.set_title(rest_label(fixed) or "all cells")
            title, name = _page_title_and_name(
                "terms", f"{dataset} / {protocol}: {metric_label(metric)} per energy-term variant", "series", label,
                chunk, [axis_label(a, rest) for a in panel_axes], page, len(panel_pages),
                f"mean, {ci_words(table)} over {over}s", _tag(dataset, protocol, metric))
            facets.finish_page(fig, axs, title, xlabel="energy terms", ylabel=metric_label(metric),
                               legend_title=None)
            out.add(name, fig)


def memory_heatmaps(runs: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig = DEFAULT_CI,
                    sink: Sink | None = None) -> FigureSet:
    """Heatmap of the metric over memory size × steps T per model (and per value of the other varying axes)."""
    out = FigureSet(sink=sink)
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        mem = next((a for a in MEMORY if a in axes and block[a].dropna().nunique() >= 2), None)
        if mem is None or STEPS not in axes or block[STEPS].dropna().nunique() < 2:
            out.skipped.append(f"memory heatmap: {dataset}/{protocol} lacks a memory axis {MEMORY} and a "
                               f"'{STEPS}' axis with ≥ 2 values each")
            continue
        present = [a for a in axes if block[a].notna().any()]
        over = summary_over(block)
        table = cached_summarize(block, metric, present, over=over, cfg=cfg, complete=True)
        table = table[table[mem].notna() & table[STEPS].notna()]
        rest = [a for a in varying(block, present) if a not in (mem, STEPS)]
        keys = ["model", *rest]
        for key, g in table.groupby(keys, dropna=False, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            means = g.pivot(index=mem, columns=STEPS, values="mean").sort_index(ascending=False)
            half = g.assign(h=(g["ci_high"] - g["ci_low"]) / 2).pivot(index=mem, columns=STEPS, values="h")
            n = g.pivot(index=mem, columns=STEPS, values="n").fillna(0)
            rows_n, cols_n = means.shape
            width = style.SINGLE_COLUMN_IN if cols_n <= HEATMAP_COLUMNS_SINGLE else style.DOUBLE_COLUMN_IN
            cell_w = (width - 1.5) / cols_n  # inches left for the cells beside labels and colour bar
            annotate = cell_w >= ANNOTATE_MIN_W_IN and rows_n <= ANNOTATE_MAX_ROWS
            row_h = 0.24 if annotate else max(0.12, min(0.2, 3.0 / rows_n))
            fig, ax = style.new_figure(width=width, height=row_h * rows_n + 1.6)
            ax = ax[0, 0]
            cmap = "viridis" if higher_is_better(metric) else "viridis_r"
            text: Any = False
            if annotate:
                text = np.array([[fmt_mean_ci(means.loc[i, j], half.loc[i, j], int(n.loc[i, j])).replace(" ± ", "\n±")
                                  for j in means.columns] for i in means.index])
            sns.heatmap(means.astype(float), annot=text, fmt="", cmap=cmap, ax=ax, annot_kws={"fontsize": 5},
                        cbar_kws={"label": metric_label(metric)}, linewidths=0.4 if annotate else 0.2,
                        linecolor="white", yticklabels=max(1, math.ceil(0.17 / row_h)))  # a 7 pt label needs ~0.17 in
            for (i, j), missing in np.ndenumerate(means.isna().to_numpy()):
                if missing:  # seaborn leaves NaN cells blank: say why
                    ax.text(j + 0.5, i + 0.5, "missing\n(n=0)" if annotate else "×", ha="center", va="center",
                            fontsize=5, color="0.4")
            ax.set_xlabel("steps T")
            ax.set_ylabel(mem.removeprefix("axis.model."))
            fixed = {"model": key[0], **dict(zip(rest, key[1:], strict=True))}
            note = "" if annotate else f"; {rows_n}×{cols_n} cells: values in the results table" + \
                ("" if means.notna().all().all() else ", × = no run")
            _title(fig, dataset, protocol, fixed, over, note=note, ci=ci_words(g))
            out.add(f"memory_{_tag(dataset, protocol, metric)}{_suffix(fixed)}", fig)
    return out


def pareto_figures(runs: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig = DEFAULT_CI,
                   sink: Sink | None = None) -> FigureSet:
    """Metric vs FLOPs per sample and vs parameters, one point per grid cell, with the Pareto front."""
    out = FigureSet(sink=sink)
    costs = [c for c in ("cost/flops_per_sample", "cost/params") if column(c) in runs.columns]
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        have = [c for c in costs if block[column(c)].notna().any()]
        if not have:
            out.skipped.append(f"pareto: {dataset}/{protocol} has no cost/flops_per_sample or cost/params metric")
            continue
        present = [a for a in axes if block[a].notna().any()]
        table, over = _summary(block, metric, present, cfg)
        keys = ["model", *present]
        cost = block.groupby(keys, dropna=False)[[column(c) for c in have]].mean().reset_index()
        table = table.merge(cost, on=keys, how="left")
        fig, axs = style.new_figure(ncols=len(have), width=style.DOUBLE_COLUMN_IN if len(have) > 1 else
                                    style.SINGLE_COLUMN_IN)
        palette = style.model_palette(table["model"])
        for ax, c in zip(axs[0], have, strict=True):
            label, scale = COST_COLUMNS[c]
            pts = table[table[column(c)].notna()].assign(x=lambda t, c=c, s=scale: t[column(c)] * s)
            dense = len(pts) > PARETO_DENSE_POINTS  # hundreds of cells: small, see-through points, capless bars
            look = {"markersize": 2.0, "elinewidth": 0.4, "capsize": 0, "alpha": 0.5} if dense else {"capsize": 1.5}
            for model in style.model_order(pts["model"].unique()):
                g = pts[pts["model"] == model]
                err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]).astype(float)
                ax.errorbar(g["x"], g["mean"], yerr=np.nan_to_num(err), fmt="o", color=palette[model], label=model,
                            **look)
            front = _pareto_front(pts["x"].to_numpy(float), pts["mean"].to_numpy(float), higher_is_better(metric))
            ax.step(pts["x"].to_numpy(float)[front], pts["mean"].to_numpy(float)[front], where="post",
                    color="0.25", linewidth=1.0, zorder=3)  # above the points: many cells would hide it
            style.cost_x(ax)
            ax.set_xlabel(label)
            ax.set_ylabel(metric_label(metric))
        _title(fig, dataset, protocol, {}, over, note="; grey: Pareto front", ci=ci_words(table))
        handles, labels = axs[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)), frameon=False)
        out.add(f"pareto_{_tag(dataset, protocol, metric)}", fig)
    return out


def _pareto_front(x: np.ndarray, y: np.ndarray, higher: bool) -> np.ndarray:
    """Indices (sorted by cost) of the points no cheaper point beats."""
    order = np.lexsort((-y if higher else y, x))
    front, best = [], -np.inf
    for i in order:
        score = y[i] if higher else -y[i]
        if np.isfinite(score) and score > best:
            front.append(i)
            best = score
    return np.asarray(front, dtype=int)
