"""Width-scaling view of a grid: the primary test metric against training FLOPs, parameters and training seconds
(log x), one line per model family over its widths, with the Pareto front, and a table of the fitted log-log slope
per family.

**Which axis is a width.** Any swept axis whose last dotted part is in :data:`WIDTH_LEAVES` (``axis.model.dim``
— the ET's ``model.et.dim`` is tagged so —, ``axis.model.vit.dim``, ``axis.model.width``, ``axis.model.hidden``
for the GNN baselines). A run's width is the first of those axes it has a value for, so families whose width
lives under different config keys share one x ordering. A grid without such an axis with ≥ 2 values gets no
scaling figure (a note under "Skipped" says so). Another varying axis that takes one value per (model, width) —
memories zipped to 4 × width — follows the width (a column of each point); any other (a learning-rate axis) gets
one figure per value, named like every report figure (``_<axis>-<value>`` suffixes). A varying learning-rate
axis (last part ``lr``) also gets the figure ``…_lr-best-val``: per (model, width) the runs of the learning rate
whose mean validation metric (``best/val/…``) is best, so the curve is each width at its own tuned lr while the
plotted test metric is not the one selected on.

**Costs** (per run, then the mean over the runs of a point):

- training FLOPs ≈ :data:`TRAIN_FLOPS_FACTOR` × ``cost/flops_per_sample`` (inference forward FLOPs per sample)
  × samples seen in training (forward + backward ≈ 3 forwards, the usual estimate; for the ET the forward is its
  whole energy descent). Samples seen are the logged ``cost/samples_seen`` where a run has it; older runs fall
  back to ``params.train.epochs`` × ``params.task.limit_train`` (exact when the training split is at least that
  large); a run with neither has no FLOPs point. The figure title says which source was used.
- parameters: ``cost/params``.
- training seconds: ``cost/train_s`` (time in training steps, summed over attempts) where logged, else
  ``cost/wall_s`` (the whole trial, evaluation and setup included); the title says which.

Every plotted point is a (model, width, other axes) cell: mean and interval over seeds (or splits) from
``stats.summarize``; its CSV (``figures/scaling_*.csv`` beside the figure) lists the config hashes of the runs
behind it and whether it is on the Pareto front of each panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox
from scipy import stats as sps

from etbench.analysis import style
from etbench.analysis.best_lr import best_value_runs
from etbench.analysis.figures import (
    FigureSet,
    Sink,
    _pareto_front,
    _slices,
    _suffix,
    _tag,
    axis_label,
    ci_words,
    metric_label,
    rest_label,
    summary_over,
    varying,
)
from etbench.analysis.metrics import column, higher_is_better, short_name
from etbench.analysis.stats import DEFAULT_CI, CIConfig
from etbench.analysis.summary_cache import cached_summarize
from etbench.analysis.tables import Table, latex_escape

#: An axis is a width axis when its last dotted part is one of these.
WIDTH_LEAVES = ("dim", "width", "hidden")
WIDTH = "width"  # the column holding each run's width
TRAIN_FLOPS_FACTOR = 3.0  # training ≈ forward + backward ≈ 3 forward passes per sample
MIN_FIT_WIDTHS = 4
LABELLED_WIDTHS = 8  # a line of at most this many points has each labelled with its width
#: where a width label may sit, in points from its marker, in order of preference (above right, below right, left)
LABEL_OFFSETS: tuple[tuple[float, float], ...] = ((2, 3), (2, -7), (-8, 3), (-8, -7))
NEEDS_WIDTHS = f"needs ≥ {MIN_FIT_WIDTHS} widths"
LR_LEAF = "lr"  # a varying axis of this last part also gets a figure at its best value per (model, width)
BEST_LR = "best-val"  # that figure's value of the lr axis in its file name and title
#: x quantities: column → axis label.
X_COSTS: dict[str, str] = {
    "train_flops": "training FLOPs (≈ 3 × fwd × samples)",
    "params": "parameters",
    "train_s": "training seconds",
}


def width_axes(axes: Sequence[str]) -> list[str]:
    """The width axes among ``axes`` (see the module docstring)."""
    return [a for a in axes if a.rsplit(".", 1)[-1] in WIDTH_LEAVES]


def _numbers(runs: pd.DataFrame, name: str) -> pd.Series:
    if name not in runs.columns:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[name], errors="coerce").astype(float)


def run_costs(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Per run: ``train_flops``, ``params``, ``train_s``; and per x a phrase saying where its values come from."""
    logged = _numbers(runs, column("cost/samples_seen"))
    planned = _numbers(runs, "params.train.epochs") * _numbers(runs, "params.task.limit_train")
    samples = logged.where(logged.notna(), planned)
    train_s, wall = _numbers(runs, column("cost/train_s")), _numbers(runs, column("cost/wall_s"))
    costs = pd.DataFrame({
        "train_flops": TRAIN_FLOPS_FACTOR * _numbers(runs, column("cost/flops_per_sample")) * samples,
        "params": _numbers(runs, column("cost/params")),
        "train_s": train_s.where(train_s.notna(), wall),
    }, index=runs.index)
    n_logged, n_planned = int(logged.notna().sum()), int((logged.isna() & planned.notna()).sum())
    sources = [f"logged cost/samples_seen ({n_logged} runs)" if n_logged else "",
               f"epochs × task.limit_train ({n_planned} runs)" if n_planned else ""]
    n_train, n_wall = int(train_s.notna().sum()), int((train_s.isna() & wall.notna()).sum())
    times = [f"cost/train_s ({n_train} runs)" if n_train else "",
             f"cost/wall_s, whole trial ({n_wall} runs)" if n_wall else ""]
    notes = {"train_flops": "samples seen from " + (" and ".join(s for s in sources if s) or "nothing logged"),
             "params": "cost/params",
             "train_s": "seconds from " + (" and ".join(t for t in times if t) or "nothing logged")}
    return costs, notes


def _hashes(values: pd.Series) -> str:
    return ";".join(sorted({str(v) for v in values.dropna()}))


def with_width(block: pd.DataFrame, widths: Sequence[str]) -> pd.DataFrame:
    """The runs of ``block`` that have a width, with it in column ``width`` (the first width axis they have)."""
    width = block[list(widths)].apply(pd.to_numeric, errors="coerce").bfill(axis=1).iloc[:, 0]
    block = block.assign(**{WIDTH: width})
    return block[block[WIDTH].notna()]


def following_width(block: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """The ``axes`` that take one value per (model, width) in ``block`` (``width`` column set): a zipped
    ``model.memories = 4 × dim``, say. They ride along as columns of each point instead of splitting the lines."""
    cells = block.groupby(["model", WIDTH], dropna=False)
    return [a for a in axes if int(cells[a].nunique(dropna=False).max()) <= 1]


def scaling_points(block: pd.DataFrame, metric: str, widths: Sequence[str], rest: Sequence[str],
                   cfg: CIConfig = DEFAULT_CI) -> tuple[pd.DataFrame, str]:
    """One row per (model, width, ``rest`` axes) cell of ``block`` (one dataset and protocol): the metric's mean,
    interval and n, the mean cost of its runs, and the config hashes behind it; and what it is summarised over."""
    block = with_width(block, widths)
    over = summary_over(block)
    table = cached_summarize(block, metric, [WIDTH, *rest], over=over, cfg=cfg, complete=False)
    table = table[table["n"] > 0]
    keys = ["dataset", "protocol", "model", WIDTH, *rest, *(["split"] if over == "seed" else [])]
    costs, _ = run_costs(block)
    per_run = pd.concat([block[[*keys, "config_hash"]], costs], axis=1)
    grouped = per_run.groupby(keys, dropna=False, sort=True)
    cells = grouped[list(X_COSTS)].mean().join(grouped["config_hash"].agg(_hashes).rename("config_hashes"))
    cells = cells.join(grouped.size().rename("n_runs")).reset_index()
    return table.merge(cells, on=keys, how="left").sort_values(["model", WIDTH], kind="stable"), over


def mark_front(part: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``part`` with a boolean ``pareto_<x>`` column per x: the point is on the front of that panel (no cheaper
    or equally cheap point with a better mean, :func:`etbench.analysis.figures._pareto_front`)."""
    part = part.reset_index(drop=True)
    for x in X_COSTS:
        flag = np.zeros(len(part), dtype=bool)
        ok = np.flatnonzero(np.isfinite(part[x].to_numpy(float)) & np.isfinite(part["mean"].to_numpy(float)))
        if ok.size:
            front = _pareto_front(part[x].to_numpy(float)[ok], part["mean"].to_numpy(float)[ok],
                                  higher_is_better(metric))
            flag[ok[front]] = True
        part[f"pareto_{x}"] = flag
    return part


def fit_slope(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int, str]:
    """Least-squares slope of log10 y on log10 x over per-width means: (slope, standard error, n widths, note);
    NaNs and a note when there are too few widths or a value is not positive."""
    n = len(x)
    if n < MIN_FIT_WIDTHS:
        return np.nan, np.nan, n, NEEDS_WIDTHS
    if (x <= 0).any() or (y <= 0).any():
        return np.nan, np.nan, n, "values ≤ 0: no log-log fit"
    fit = sps.linregress(np.log10(x), np.log10(y))
    return float(fit.slope), float(fit.stderr), n, ""


@dataclass
class ScalingOutput:
    """The figures (sent to the sink), the data behind each (file stem → frame), and the slope table."""

    figures: FigureSet
    points: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    fit: Table | None = None


def scaling_figures(runs: pd.DataFrame, metric: str, axes: Sequence[str], cfg: CIConfig = DEFAULT_CI,
                    sink: Sink | None = None) -> ScalingOutput:
    """Scaling figures of ``runs`` (one task) for each dataset / protocol whose runs have a width axis with ≥ 2
    values: one figure per value of the other varying axes (file ``scaling_<dataset>_<protocol>_<metric>[_axis-
    value…]``), its points as a frame of the same name, and one slope table over all of them."""
    out = ScalingOutput(FigureSet(sink=sink))
    fits: list[dict[str, object]] = []
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        present = [a for a in axes if block[a].notna().any()]
        widths = width_axes(present)
        if not widths or block[widths].stack().nunique() < 2:
            out.figures.skipped.append(f"scaling: {dataset}/{protocol} has no width axis (an axis named "
                                       f"{'/'.join(WIDTH_LEAVES)}) with ≥ 2 values")
            continue
        without = sorted(set(block["model"]) - set(with_width(block, widths)["model"]))
        if without:
            out.figures.skipped.append(f"scaling: {dataset}/{protocol}: {', '.join(without)} ha"
                                       f"{'s' if len(without) == 1 else 've'} no width axis value: not drawn")
        others = [a for a in varying(block, present) if a not in widths]
        follow = following_width(with_width(block, widths), others)
        rest = [a for a in others if a not in follow]  # each value of these: a figure of its own
        _, notes = run_costs(block)
        where = (str(dataset), str(protocol))
        table, over = scaling_points(block, metric, widths, [*follow, *rest], cfg)
        fits += _emit(out, table, rest, {}, metric, where, over, notes, "")
        lr = next((a for a in rest if a.rsplit(".", 1)[-1] == LR_LEAF), None)
        if lr is None:
            continue
        val = metric.replace("/test/", "/val/", 1)
        if val == metric or column(val) not in block.columns or block[column(val)].isna().all():
            out.figures.skipped.append(f"scaling: {dataset}/{protocol} has no {val} to pick the best {lr} by")
            continue
        others_rest = [a for a in rest if a != lr]
        chosen = best_lr_runs(with_width(block, widths), lr, others_rest, val, higher_is_better(metric))
        table, over = scaling_points(chosen, metric, widths, [*follow, lr, *others_rest], cfg)
        note = f"{axis_label(lr, rest)} per (model, width): best mean {short_name(val)} (see the CSV)"
        fits += _emit(out, table, others_rest, {lr: BEST_LR}, metric, where, over, notes, note)
    if fits:
        out.fit = _fit_table(pd.DataFrame(fits), metric)
    return out


def best_lr_runs(block: pd.DataFrame, lr: str, rest: Sequence[str], val_metric: str, higher: bool) -> pd.DataFrame:
    """The runs of ``block`` (``width`` column set) at the ``lr`` value whose mean ``val_metric`` over seeds is
    best per (model, width, ``rest`` axes) — chosen on validation, so the test metric plotted stays held out; a tie
    goes to the smaller value."""
    return best_value_runs(block, lr, ["model", WIDTH, *rest], val_metric, higher)


def _emit(out: ScalingOutput, table: pd.DataFrame, rest: Sequence[str], extra: dict[str, object], metric: str,
          where: tuple[str, str], over: str, notes: dict[str, str], note: str) -> list[dict[str, object]]:
    """One figure (and its points) per slice of ``table`` over ``rest``; the slope rows of every slice."""
    fits: list[dict[str, object]] = []
    for fixed, part in _slices(table, rest):
        fixed = {**extra, **fixed}
        part = mark_front(part, metric)
        name = f"scaling_{_tag(*where, metric)}{_suffix(fixed)}"
        if _draw(part, metric, *where, fixed, over, notes, name, out.figures, note):
            out.points.append((name, part))
        fits += [{"dataset": where[0], "protocol": where[1], "cell": rest_label(fixed) or "all", **row}
                 for row in _fits(part, metric)]
    return fits


def _draw(part: pd.DataFrame, metric: str, dataset: str, protocol: str, fixed: dict[str, object], over: str,
          notes: dict[str, str], name: str, figs: FigureSet, note: str = "") -> bool:
    have = [x for x in X_COSTS if part[x].notna().any()]
    if not have:
        figs.skipped.append(f"scaling: {name} has no cost/flops_per_sample, cost/params or training time")
        return False
    sources = "; ".join(notes[x] for x in have if x != "params")
    lines = [line for line in (
        f"{dataset} / {protocol}: {metric_label(metric)} vs cost over width, one line per model",
        rest_label(fixed), f"mean, {ci_words(part)} over {over}s; ringed + grey step: Pareto front; small numbers: "
        "width", note, sources) if line]
    fig, axs = style.new_figure(ncols=len(have), width=style.DOUBLE_COLUMN_IN if len(have) > 1 else
                                style.SINGLE_COLUMN_IN, height=1.9 + 0.16 * len(lines))
    models = style.model_order(part["model"].unique())
    palette = style.model_palette(models)
    for ax, x in zip(axs[0], have, strict=True):
        pts = part[part[x].notna()].sort_values(x)
        for model in models:
            g = pts[pts["model"] == model]
            if g.empty:
                continue
            n = sorted({int(v) for v in g["n"]})
            n_text = f"n={n[0]}" if len(n) == 1 else f"n={n[0]}–{n[-1]}"
            err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]]).astype(float)
            ax.errorbar(g[x], g["mean"], yerr=np.nan_to_num(err), fmt="-o", color=palette[model], capsize=1.5,
                        label=f"{model} ({n_text})")
            if len(g) <= LABELLED_WIDTHS:  # which width each point is (the CSV has them all)
                for xv, yv, w in zip(g[x], g["mean"], g[WIDTH], strict=True):
                    ax.annotate(f"{w:g}", (xv, yv), xytext=LABEL_OFFSETS[0], textcoords="offset points", fontsize=5,
                                color=palette[model])
        front = pts[pts[f"pareto_{x}"]]
        ax.step(front[x], front["mean"], where="post", color="0.25", linewidth=1.0, zorder=3)
        ax.plot(front[x], front["mean"], "o", mfc="none", mec="0.1", markersize=6, zorder=4)
        _log_x(ax)
        ax.set_xlabel(X_COSTS[x])
        ax.set_ylabel(metric_label(metric))
    fig.suptitle("\n".join(lines))
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))), frameon=False)
    _separate_width_labels(fig)
    figs.add(name, fig)
    return True


def _separate_width_labels(fig: Figure) -> None:
    """Move each width label that would overlap a label placed before it (points close in cost, other families'
    points) to the first free one of :data:`LABEL_OFFSETS`, or hide it (the figure's CSV lists every width)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in fig.axes:
        placed: list[Bbox] = []
        for label in (t for t in ax.texts if isinstance(t, Annotation)):
            for offset in LABEL_OFFSETS:
                label.xyann = offset
                box = label.get_window_extent(renderer)
                if not any(box.overlaps(other) for other in placed) and ax.bbox.contains(box.x0, box.y0) \
                        and ax.bbox.contains(box.x1, box.y1):
                    placed.append(box)
                    break
            else:
                label.set_visible(False)


def _log_x(ax: Axes) -> None:
    """Log x with short major labels (``5k``, ``200G``): every integer multiple per decade when the data span under
    0.7 decades, 1, 2, 5 up to about one decade, 1 and 3 up to two and a half, decades beyond; no minor labels (they
    overlap on a narrow panel)."""
    ax.set_xscale("log")
    low, high = ax.dataLim.intervalx
    decades = float(np.log10(high / low)) if low > 0 and high > low else 0.0
    subs = (tuple(float(k) for k in range(1, 10)) if decades < 0.7 else (1.0, 2.0, 5.0) if decades <= 1.3
            else (1.0, 3.0) if decades <= 2.5 else (1.0,))
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: short_number(v)))


def short_number(value: float) -> str:
    """A tick label of at most four characters for the positive numbers these axes hold: 0.5, 20, 5k, 3M, 200G."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _fits(part: pd.DataFrame, metric: str) -> list[dict[str, object]]:
    """Slope of log metric on log cost per model and x, over the per-width means."""
    rows = []
    for model in style.model_order(part["model"].unique()):
        g = part[part["model"] == model]
        for x in X_COSTS:
            per_width = g[g[x].notna() & g["mean"].notna()].groupby(WIDTH)[[x, "mean"]].mean()
            if per_width.empty:
                continue
            slope, se, n, note = fit_slope(per_width[x].to_numpy(float), per_width["mean"].to_numpy(float))
            rows.append({"model": model, "x": x, "n_widths": n, "slope": slope, "se": se, "note": note})
    return rows


def _fit_table(data: pd.DataFrame, metric: str) -> Table:
    dataset_protocol = data[["dataset", "protocol"]].drop_duplicates()
    name = "scaling_fit_" + "_".join(_tag(str(d), str(p), metric) for d, p in dataset_protocol.to_numpy())
    display = pd.DataFrame({
        "dataset / protocol": data["dataset"].astype(str) + " / " + data["protocol"].astype(str),
        "cell": data["cell"], "model": data["model"], "x": data["x"].map(X_COSTS),
        "widths": data["n_widths"].astype(int).astype(str),
        "slope ± SE": [note if note else f"{s:.3g} ± {e:.2g}" for s, e, note in
                       zip(data["slope"], data["se"], data["note"], strict=True)],
    }).astype(str)
    direction = "higher" if higher_is_better(metric) else "lower"
    caption = (f"Fitted log-log slope d log10({short_name(metric)}) / d log10(cost) per model family, ordinary "
               f"least squares over the per-width means (one point per width; scipy.stats.linregress), ± its "
               f"standard error; widths = points in the fit; fewer than {MIN_FIT_WIDTHS} widths: "
               f"'{NEEDS_WIDTHS}'. {direction.capitalize()} is better for {short_name(metric)}, so a "
               f"{'positive' if direction == 'higher' else 'negative'} slope means the metric improves with cost. "
               f"Training FLOPs ≈ {TRAIN_FLOPS_FACTOR:g} × inference forward FLOPs/sample × samples seen. Data: "
               f"figures/scaling_*.csv.")
    bold = pd.DataFrame(False, index=display.index, columns=display.columns)
    title = f"Scaling: fitted slope of {short_name(metric)} vs cost per model family"
    return Table(name, title, caption, display, display.map(latex_escape), bold, data)


__all__ = [
    "WIDTH_LEAVES",
    "X_COSTS",
    "ScalingOutput",
    "best_lr_runs",
    "fit_slope",
    "following_width",
    "mark_front",
    "run_costs",
    "scaling_figures",
    "scaling_points",
    "width_axes",
    "with_width",
]
