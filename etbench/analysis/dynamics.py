"""The figure of ``etbench dynamics``: from dynamics.csv alone, the headline test metric, the final energy and the
gradient norm ‖∂E/∂g‖ (for vit-tied, which has no energy: the last update's ‖Δx‖) against the test-time step
count T', one line per step-size scale α'/α."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from etbench.analysis import style
from etbench.analysis.metrics import short_name
from etbench.tracking.schema import DYNAMICS_COLUMNS, DYNAMICS_KEYS

HEADLINE = ("test/mse_masked", "test/auroc")  # image, graph: drawn first when present


def headline(table: pd.DataFrame) -> str:
    """The metric column to draw: a task's headline (``HEADLINE``), else its first ``test/*`` column."""
    metrics = [c for c in table.columns if c.startswith("test/")]
    if not metrics:
        raise ValueError(f"dynamics table has no test/* metric column; columns: {list(table.columns)}")
    return next((m for m in HEADLINE if m in metrics), metrics[0])


def dynamics_figure(csv_path: Path, out_stem: Path, title: str = "") -> list[Path]:
    """Draw ``csv_path`` (a dynamics.csv) into ``out_stem``.pdf/.png; returns the two paths."""
    table = pd.read_csv(csv_path)
    missing = [c for c in (*DYNAMICS_KEYS, *DYNAMICS_COLUMNS) if c not in table.columns]
    if missing:
        raise ValueError(f"{csv_path}: not a dynamics table, lacks column(s) {missing}")
    metric = headline(table)
    has_energy = table["energy"].notna().any()
    panels = [(metric, short_name(metric))]
    panels += [("energy", "final energy E(x_T')"), ("grad_norm", "‖∂E/∂g‖ at x_T', token mean")] \
        if has_energy else [("delta_norm", "‖Δx‖ of the last update")]
    scales = sorted(table["alpha_scale"].unique())
    colours = dict(zip(scales, sns.color_palette("viridis", len(scales)), strict=True))
    fig, axs = style.new_figure(ncols=len(panels), width=style.DOUBLE_COLUMN_IN,
                                height=0.34 * style.DOUBLE_COLUMN_IN)
    for ax, (col, label) in zip(axs[0], panels, strict=True):
        for s in scales:
            g = table[table["alpha_scale"] == s].sort_values("eval_steps")
            if g[col].notna().any():
                ax.plot(g["eval_steps"], g[col], marker="o", color=colours[s], label=f"α'/α = {s:g}")
        values = table[col].dropna()
        if col == "grad_norm" and (values > 0).all() and values.max() >= 10 * values.min():
            ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("test-time steps T'")
    handles, labels = axs[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)), frameon=False)
    fig.suptitle(title or f"test-time dynamics: {metric}, energy and gradient norm vs T'")
    return style.save(fig, out_stem)
