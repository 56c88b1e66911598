"""Small multiples for large grids: how many lines a panel and panels a page may hold, and the page figure itself.

A grid of thousands of runs has hundreds of cells; one line (or one figure) per cell is unreadable or floods the
report. Figures therefore draw at most ``LINES_PER_PANEL`` lines per panel and ``PANELS_PER_PAGE`` panels per
figure; beyond that the cells are split into pages (separate files, named by the values they hold). Pages use a
fixed grid layout with the legend outside the panels (one shared legend under them), which is also far cheaper
to draw than matplotlib's constrained layout at a dozen panels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from etbench.analysis import style

LINES_PER_PANEL = 8
PANELS_PER_PAGE = 12
COLUMNS = 4
#: Up to this many slices a figure family writes one file per slice; beyond it, pages of small multiples.
SEPARATE_MAX = 4
PANEL_H_IN = 1.45
TITLE_LINE_IN = 0.16


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in as few consecutive chunks of at most ``size`` as possible, of balanced lengths (9 items at
    size 8 → 5 + 4, not 8 + 1); at least one chunk, possibly empty."""
    n = math.ceil(len(items) / max(1, size))
    if n <= 1:
        return [list(items)]
    even = math.ceil(len(items) / n)
    return [list(items[i:i + even]) for i in range(0, len(items), even)]


def page_suffix(index: int, count: int) -> str:
    """"" for a single page, else "_page-2of5" (1-based)."""
    return "" if count <= 1 else f"_page-{index + 1}of{count}"


def value_colours(values: Sequence[Any]) -> dict[Any, tuple[float, float, float]]:
    """A viridis colour per value, in value order, spread over the whole map (figures call it per page, so the
    lines of a page are as distinct as they can be; the legend names each value)."""
    ordered = list(dict.fromkeys(values))
    return dict(zip(ordered, sns.color_palette("viridis", max(1, len(ordered))), strict=False))


def page_figure(n_panels: int, *, title_lines: int = 3, legend_entries: int = 0, legend_cols: int = 4,
                ncols: int | None = None) -> tuple[Figure, list[Axes]]:
    """A double-column figure with ``n_panels`` panels on a fixed grid, room above for a ``title_lines`` title and
    below for a shared legend of ``legend_entries`` entries; unused grid cells are hidden."""
    style.apply()
    ncols = ncols or min(COLUMNS, max(1, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    legend_rows = math.ceil(legend_entries / legend_cols) if legend_entries else 0
    top_in = 0.12 + TITLE_LINE_IN * title_lines + 0.22  # suptitle, then the first row's panel titles
    bottom_in = 0.42 + (0.08 + 0.15 * legend_rows + (0.15 if legend_entries else 0.0))
    height = nrows * PANEL_H_IN + top_in + bottom_in
    width = style.DOUBLE_COLUMN_IN if ncols > 1 else style.SINGLE_COLUMN_IN
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(nrows, ncols, left=0.8 / width, right=1 - 0.12 / width, top=1 - top_in / height,
                            bottom=bottom_in / height, wspace=0.42, hspace=0.62)
    axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(nrows * ncols)]
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def distinct_legend(axes: Sequence[Axes]) -> tuple[list[Any], list[str]]:
    """The legend entries of every panel, each label once, first seen first: one legend for a page of panels."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def finish_page(fig: Figure, axes: list[Axes], title: str, *, xlabel: str, ylabel: str, legend_title: str | None,
                legend_cols: int = 4) -> None:
    """Suptitle at the top, x labels on the lowest panel of each column, y labels on the left column, and one
    legend (the distinct labels of every panel, first seen first) centred under the panels."""
    ncols = min(COLUMNS, max(1, len(axes))) if len(axes) > 1 else 1
    for i, ax in enumerate(axes):
        if i + ncols >= len(axes):
            ax.set_xlabel(xlabel)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
    handles, labels = distinct_legend(axes)
    fig.suptitle(title, y=1 - 0.04 / fig.get_figheight(), va="top")
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.01), ncols=min(legend_cols, len(labels)),
                   frameon=False, title=legend_title)


def ticks_for(ax: Axes, values: Sequence[float], max_ticks: int = 6) -> None:
    """x ticks at the grid's values, thinned to at most ``max_ticks`` so labels never collide."""
    vals = sorted(set(float(v) for v in values))
    if len(vals) > max_ticks:
        idx = np.unique(np.linspace(0, len(vals) - 1, max_ticks).round().astype(int))
        vals = [vals[i] for i in idx]
    ax.set_xticks(vals, [f"{v:g}" for v in vals])
