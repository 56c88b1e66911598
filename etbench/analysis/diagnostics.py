"""Descent-diagnostics figures: the per-token gradient norm ‖∂E/∂g‖ and the relative update ‖Δx‖/‖x‖ against the
descent step, per ablation value — how close the T steps bring the tokens to a fixed point of E.

Input is ``cache.energy_frame`` (the diagnostics columns of energy_trace.csv, or the ``energy/grad_norm_*`` and
``energy/rel_update`` histories). Runs whose traces predate the diagnostics have NaN there and are left out.
Bands: 95% Student t intervals over samples and seeds (``descent.descent_curves``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from etbench.analysis import facets, style
from etbench.analysis.descent import BAND_CI, descent_curves
from etbench.analysis.figures import STEPS, FigureSet, Sink, axis_label, value_text, varying
from etbench.analysis.stats import CIConfig
from etbench.tracking.schema import FIXED_POINT_TOL

PANELS = {"grad_norm_mean": "‖∂E/∂g‖ per token (mean over tokens)", "rel_update": "relative update ‖Δx‖/‖x‖"}


def diagnostics_figures(energy: pd.DataFrame, axes: Sequence[str], cfg: CIConfig = BAND_CI,
                        sink: Sink | None = None) -> FigureSet:
    """Per (dataset, protocol, model) with diagnostics: one 2-panel figure, one line per ablation cell (beyond
    ``facets.LINES_PER_PANEL`` cells: per value of T, else of the first varying axis, the rest pooled). The dashed
    line on the relative-update panel is the fixed-point tolerance."""
    out = FigureSet(sink=sink)
    have = [c for c in PANELS if c in energy.columns]
    if energy.empty:  # energy_figures already says why
        return out
    if len(have) < len(PANELS) or energy[have].notna().sum().sum() == 0:
        out.skipped.append("descent diagnostics: no energy trace has gradient norms or relative updates")
        return out
    for (dataset, protocol, model), block in energy.groupby(["dataset", "protocol", "model"], sort=True):
        block = block[block["grad_norm_mean"].notna() | block["rel_update"].notna()]
        if block.empty:
            continue
        ablate = varying(block, [a for a in axes if a in block.columns])
        pooled: list[str] = []
        if ablate and len(block[ablate].drop_duplicates()) > facets.LINES_PER_PANEL:
            keep = STEPS if STEPS in ablate else ablate[0]
            pooled, ablate = [a for a in ablate if a != keep], [keep]
        curves = descent_curves(block, ablate, cfg, terms=tuple(PANELS))
        curves = curves[curves["n"] > 0]
        out.tables.append((f"descent_diagnostics_{dataset}_{protocol}_{model}", curves))
        cells = (curves[ablate].drop_duplicates().sort_values(ablate).map(value_text).agg(", ".join, axis=1)
                 .tolist()[: facets.LINES_PER_PANEL] if ablate else [str(model)])
        cell_of = curves[ablate].map(value_text).agg(", ".join, axis=1) if ablate else pd.Series(str(model),
                                                                                               curves.index)
        colours = dict(zip(cells, sns.color_palette("viridis", len(cells)) if ablate else
                           [style.model_palette([model])[model]], strict=True))
        fig, axs = style.new_figure(ncols=2, width=style.DOUBLE_COLUMN_IN, height=0.34 * style.DOUBLE_COLUMN_IN)
        for ax, term in zip(axs[0], PANELS, strict=True):
            part = curves[curves["term"] == term]
            for cell in cells:
                g = part[cell_of.loc[part.index] == cell].sort_values("step")
                if g["mean"].notna().sum() == 0:
                    continue
                ax.plot(g["step"], g["mean"], color=colours[cell], label=cell, marker=".")
                low = np.clip(g["ci_low"].to_numpy(float), g["mean"].min() * 1e-3, None)
                ax.fill_between(g["step"].to_numpy(float), low, g["ci_high"].to_numpy(float), color=colours[cell],
                                alpha=0.2, linewidth=0)
            if term == "rel_update":
                ax.axhline(FIXED_POINT_TOL, color="grey", linestyle="--", linewidth=0.8,
                           label=f"fixed-point tolerance {FIXED_POINT_TOL:g}")
            if part["mean"].gt(0).any():
                ax.set_yscale("log")
            ax.set_title(PANELS[term])
            ax.set_xlabel("descent step t")
        handles, labels = facets.distinct_legend(axs[0])
        pool = f"; pooled over {', '.join(axis_label(a, pooled) for a in pooled)}" if pooled else ""
        fig.suptitle(f"{model} · {dataset} / {protocol}: descent diagnostics, mean and 95% CI (Student t) over "
                     f"samples and seeds{pool}")
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)), frameon=False,
                       title=", ".join(axis_label(a, ablate) for a in ablate) or None)
        out.add(f"descent_diagnostics_{dataset}_{protocol}_{model}", fig)
    return out
