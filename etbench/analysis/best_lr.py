"""Each grid cell at its own best learning rate, chosen on validation (issue 27.7; science review C11).

An ablation at one fixed learning rate confounds the ablated factor (steps T, energy terms, memories) with how well
that lr suits each cell. A grid with a learning-rate axis (any axis whose last dotted part is ``lr``) gets, beside
its per-lr tables and figures, a view in which every cell — (dataset, protocol, model, the other axis values) — is
represented by the runs of the lr whose **mean validation** metric over its seeds and splits is best
(:func:`best_value_runs`; a tie goes to the smaller lr). The test metric shown is then never the one selected on.
:func:`selection_table` lists, per cell, the mean validation metric at every lr and the choice, and flags a choice at
the edge of the searched values (the best lr might lie beyond it).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from etbench.analysis.metrics import column, short_name
from etbench.analysis.tables import Table, fmt_sig, latex_escape

LR_LEAF = "lr"
BEST = "best-val"  # the lr's value in file names of this view (``…_lr-best-val``)
SUFFIX = f"_{LR_LEAF}-{BEST}"


def lr_axis(block: pd.DataFrame, axes: Sequence[str]) -> str | None:
    """The first axis of ``axes`` whose last part is ``lr`` and which takes ≥ 2 values in ``block``."""
    for a in axes:
        if a.rsplit(".", 1)[-1] == LR_LEAF and a in block.columns and block[a].dropna().nunique() > 1:
            return a
    return None


def validation_metric(metric: str) -> str | None:
    """``best/val/x`` for ``best/test/x`` (the selection metric of a test metric); None when there is none."""
    val = metric.replace("/test/", "/val/", 1)
    return None if val == metric else val


def best_value_runs(block: pd.DataFrame, axis: str, keys: Sequence[str], val_metric: str,
                    higher: bool) -> pd.DataFrame:
    """The runs of ``block`` at the value of ``axis`` whose mean ``val_metric`` (over the runs of that value: seeds,
    splits) is best per cell ``keys``; a tie goes to the smaller value, and a cell without a validation value at
    any ``axis`` value is dropped."""
    value, keys = column(val_metric), list(keys)
    means = block.groupby([*keys, axis], dropna=False)[value].mean().reset_index()
    means = means[means[value].notna()].sort_values([*keys, value, axis], na_position="first", kind="stable",
                                                    ascending=[True] * len(keys) + [not higher, True])
    best = means.drop_duplicates(keys)[[*keys, axis]]
    return block.merge(best, on=[*keys, axis], how="inner")


def chosen_values(picked: pd.DataFrame, axis: str, keys: Sequence[str]) -> pd.DataFrame:
    """One row per cell of ``picked`` (from :func:`best_value_runs`): the cell ``keys`` and its chosen ``axis``."""
    return picked[[*keys, axis]].drop_duplicates(list(keys))


def selection_table(block: pd.DataFrame, axis: str, keys: Sequence[str], val_metric: str, higher: bool,
                    dataset: str, protocol: str) -> Table:
    """Per cell: the mean ``val_metric`` and run count at each value of ``axis``, the chosen value (bold) and
    whether it is the smallest or largest value searched."""
    value, keys = column(val_metric), list(keys)
    grouped = block.groupby([*keys, axis], dropna=False)[value]
    stats = grouped.mean().rename("mean").to_frame().join(grouped.count().rename("n")).reset_index()
    chosen = chosen_values(best_value_runs(block, axis, keys, val_metric, higher), axis, keys)
    searched = sorted(block[axis].dropna().unique())
    shown = [k for k in keys if k not in ("dataset", "protocol")]
    cells = stats[keys].drop_duplicates().merge(chosen.rename(columns={axis: "chosen"}), on=keys, how="left")
    label = axis.removeprefix("axis.")
    rows, bold_rows = [], []
    for _, cell in cells.iterrows():
        row = {k.removeprefix("axis."): "–" if pd.isna(cell[k]) else str(cell[k]) for k in shown}
        bold = dict.fromkeys(row, False)
        part = stats[_same(stats, cell, keys)]
        for v in searched:
            got = part[part[axis] == v]
            col = f"{label}={fmt_sig(float(v))}"
            row[col] = "–" if got.empty or pd.isna(got["mean"].iloc[0]) else (
                f"{fmt_sig(float(got['mean'].iloc[0]))} (n={int(got['n'].iloc[0])})")
            bold[col] = bool(not pd.isna(cell["chosen"]) and v == cell["chosen"])
        pick = cell["chosen"]
        row[f"chosen {label}"] = "none (no validation value)" if pd.isna(pick) else fmt_sig(float(pick))
        edge = not pd.isna(pick) and len(searched) >= 2 and pick in (searched[0], searched[-1])
        row["at the edge"] = ("largest searched" if pick == searched[-1] else "smallest searched") if edge else ""
        bold.update({f"chosen {label}": False, "at the edge": False})
        rows.append(row)
        bold_rows.append(bold)
    display = pd.DataFrame(rows).astype(str)
    bold_frame = pd.DataFrame(bold_rows, columns=display.columns).fillna(False).astype(bool)
    direction = "highest" if higher else "lowest"
    caption = (f"Dataset {dataset}, protocol {protocol}. Learning-rate selection per grid cell: the mean "
               f"{short_name(val_metric)} over the cell's runs (seeds and splits; n = runs) at each searched "
               f"{label}; the {direction} is chosen (bold; a tie goes to the smaller {label}), and the "
               f"'{SUFFIX.lstrip('_')}' tables and figures show each cell's test metrics at that {label} only. "
               f"'at the edge': the choice is the smallest or largest value searched, so a better {label} may lie "
               f"beyond the range.")
    data = stats.merge(chosen.rename(columns={axis: "chosen"}), on=keys, how="left").assign(
        chosen_flag=lambda f: f[axis] == f["chosen"], selection_metric=val_metric)
    name = f"lr_selection_{dataset}_{protocol}"
    title = f"{dataset} / {protocol} — {label} chosen per cell on {short_name(val_metric)}"
    return Table(name, title, caption, display, display.map(latex_escape), bold_frame, data)


def _same(stats: pd.DataFrame, cell: pd.Series, keys: Sequence[str]) -> pd.Series:
    """Rows of ``stats`` equal to ``cell`` on ``keys`` where NaN counts as equal to NaN (an axis a model lacks)."""
    same = pd.Series(True, index=stats.index)
    for k in keys:
        same &= (stats[k] == cell[k]) | (stats[k].isna() & pd.isna(cell[k]))
    return same
