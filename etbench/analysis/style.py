"""The one paper style for every etbench figure: 8 pt fonts, fixed colour per model, column widths, saving.

Colours come from seaborn's colour-blind palette and are bound to model names, so "et" has the same colour in
every figure of every report; models outside the registry get grey shades in a fixed (sorted) order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine
from matplotlib.text import Text

SINGLE_COLUMN_IN = 3.3
PNG_DPI = 150  # the PNG is the preview; the PDF (vector) is the paper figure
DOUBLE_COLUMN_IN = 6.9
FONT_PT = 8

#: Registry model names in registry order (``registry.all_names()``; analysis may not import models, so a test
#: checks the two agree); the position fixes the colour (the ladder's: its place on its ramp).
_CORE = ("et", "vit", "vit-tied", "vit-pm", "mlp", "gcn", "sage", "gat", "gin", "bwgnn", "xgbgraph")
#: The ET-ladder rungs (etbench.models.ladder), between the ET and the ViTs, on one sequential ramp (an order).
LADDER = tuple(f"ladder-{i}" for i in range(1, 6))
MODELS = (_CORE[0], *LADDER, *_CORE[1:])
# the 10 colour-blind-safe colours, then black (seaborn's palette would repeat the ET's blue for an 11th model)
_COLOURS = [*sns.color_palette("colorblind", 10), (0.0, 0.0, 0.0)]
_RAMP = sns.color_palette("flare", len(LADDER))
PALETTE: dict[str, tuple[float, float, float]] = {**dict(zip(_CORE, _COLOURS, strict=True)),
                                                 **dict(zip(LADDER, _RAMP, strict=True))}
_GREYS = sns.color_palette("Greys", 6)[2:]

#: Energy terms in plot order, each with a fixed line style.
ENERGY_STYLE = {"E": "-", "E_att": "--", "E_hn": ":"}
#: Order of the energy-term ablation values.
TERMS_ORDER = ("attn+hn", "attn", "hn")


def model_order(models: Iterable[str]) -> list[str]:
    """Registry order first, then unknown names sorted."""
    models = set(models)
    return [m for m in MODELS if m in models] + sorted(models - set(MODELS))


def model_palette(models: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """Colour per model: the fixed registry colour, or a grey for a name the registry does not know."""
    unknown = sorted(set(models) - set(MODELS))
    out = {m: PALETTE[m] for m in set(models) if m in PALETTE}
    out.update({m: _GREYS[i % len(_GREYS)] for i, m in enumerate(unknown)})
    return out


def apply() -> None:
    """Set the paper rcParams (called by every figure function)."""
    sns.set_theme(context="paper", style="ticks", font_scale=1.0)
    plt.rcParams.update({
        "font.size": FONT_PT,
        "axes.titlesize": FONT_PT,
        "axes.labelsize": FONT_PT,
        "xtick.labelsize": FONT_PT - 1,
        "ytick.labelsize": FONT_PT - 1,
        "legend.fontsize": FONT_PT - 1,
        "legend.title_fontsize": FONT_PT - 1,
        "figure.titlesize": FONT_PT,
        "lines.linewidth": 1.2,
        "lines.markersize": 3.5,
        "axes.linewidth": 0.6,
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "savefig.dpi": 300,
        "figure.dpi": PNG_DPI,  # = the PNG's dpi, so a check right after saving it sees the saved layout
    })


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = SINGLE_COLUMN_IN, height: float | None = None,
               **kwargs: object) -> tuple[Figure, object]:
    """A figure in the paper style with constrained layout; ``height`` defaults to 0.75 × width per row."""
    apply()
    height = height if height is not None else 0.75 * SINGLE_COLUMN_IN * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kwargs)
    return fig, axes


def cost_x(ax: Axes) -> None:
    """x axis for a cost spanning orders of magnitude: log with plain labels (1, 2, 5 per decade over short
    ranges) when the data span a factor ≥ 10, else linear with at most 4 ticks."""
    low, high = ax.dataLim.intervalx
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if low > 0 and high / low >= 10:
        ax.set_xscale("log")
        subs = (1.0, 2.0, 5.0) if math.log10(high / low) < 2 else (1.0,)
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(plain)


def save(fig: Figure, stem: Path, *, close: bool = True) -> list[Path]:
    """Save ``fig`` as ``stem.pdf`` and ``stem.png`` (closing it unless ``close=False``), return both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    # not ``with_suffix``: a stem such as "..._lr-0.0005" has a dot that is part of a value, not a suffix
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    fig.savefig(paths[0], dpi=PNG_DPI)
    fig.savefig(paths[1])
    if close:
        plt.close(fig)
    return paths[::-1]


def freeze_layout(fig: Figure) -> None:
    """Run the figure's layout engine (constrained layout) once and keep its result: with an engine set,
    every ``savefig`` first makes a dry-run draw only to lay the figure out again, so a PNG and a PDF cost four
    draws instead of two. The frozen positions are those of the PNG, which is also what the label check sees."""
    engine = fig.get_layout_engine()
    if engine is None or not fig.axes or isinstance(engine, PlaceHolderLayoutEngine):
        return
    engine.execute(fig)
    with plt.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)  # no engine at all: "none" leaves a placeholder, and savefig dry-runs for it


def save_checked(fig: Figure, stem: Path) -> tuple[list[Path], list[str]]:
    """Save ``fig`` as PNG, check its labels on exactly that layout (:func:`label_problems` without another
    draw), save the PDF, close it; return (pdf and png paths, the problems)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    fig.set_dpi(PNG_DPI)
    freeze_layout(fig)
    fig.savefig(png, dpi=PNG_DPI)
    problems = label_problems(fig, draw=False)
    fig.savefig(pdf)
    plt.close(fig)
    return [pdf, png], problems


def _drawn_tick_labels(axis: Axis) -> list[Text]:
    """Tick labels of ``axis`` that are drawn (matplotlib keeps labels of ticks outside the view limits)."""
    low, high = sorted(axis.get_view_interval())
    span = (high - low) * 1e-9
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1 for t in ticks if t.get_visible() and low - span <= t.get_loc() <= high + span]


def label_problems(fig: Figure, *, draw: bool = True) -> list[str]:
    """Texts (titles, axis and tick labels, legends, texts inside the axes such as heatmap cell labels) that
    overlap each other or stick out of the figure. ``draw=False`` reuses the layout of the last draw (a figure
    just saved), saving a full redraw."""
    if draw:
        fig.draw_without_rendering()  # layout and text positions, without rasterising anything
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    texts: list[Text] = []
    legends = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        texts += _drawn_tick_labels(ax.xaxis) + _drawn_tick_labels(ax.yaxis) + list(ax.texts)
    for legend in legends:
        if legend is not None:
            texts += [*legend.get_texts(), legend.get_title()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    frame = fig.bbox
    problems = [f"{a!r} overlaps {b!r}" for (a, ba), (b, bb) in combinations(boxes, 2) if ba.overlaps(bb)]
    problems += [f"{a!r} sticks out of the figure" for a, box in boxes
                 if box.x0 < frame.x0 - 1 or box.y0 < frame.y0 - 1 or box.x1 > frame.x1 + 1 or box.y1 > frame.y1 + 1]
    return problems
