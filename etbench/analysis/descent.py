"""Energy-descent figures: E, E_att and E_hn against descent step t, per ablation value.

Input is ``cache.energy_frame``: one row per (run, step, sample) from energy_trace.csv artifacts, or per
(run, step) from the ``energy/*`` metric histories. Bands are 95% CIs of the mean over all samples and
seeds at that step: Student t intervals — a band holds samples × seeds values (tens to thousands), where the t
interval and a bootstrap agree, and thousands of bands would cost a bootstrap each.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns

from etbench.analysis import style
from etbench.analysis.figures import FigureSet, varying
from etbench.analysis.stats import CIConfig, mean_ci

TERMS = ("E", "E_att", "E_hn")
TERM_LABEL = {"E": "E (total)", "E_att": "E_att (attention)", "E_hn": "E_hn (Hopfield)"}
BAND_CI = CIConfig(method="t")


def descent_curves(energy: pd.DataFrame, keys: Sequence[str], cfg: CIConfig = BAND_CI) -> pd.DataFrame:
    """Mean, CI and n of each energy term per (keys, step), over samples and seeds."""
    rows = []
    for key, g in energy.groupby([*keys, "step"], dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        base = dict(zip([*keys, "step"], key, strict=True))
        for term in TERMS:
            s = mean_ci(g[term].to_numpy(float), cfg)
            rows.append({**base, "term": term, **s})
    return pd.DataFrame(rows)


def energy_figures(energy: pd.DataFrame, axes: Sequence[str], cfg: CIConfig = BAND_CI) -> FigureSet:
    """One 3-panel figure (E, E_att, E_hn) per (dataset, protocol, model); one line per ablation cell."""
    out = FigureSet()
    if energy.empty:
        out.skipped.append("energy descent: no run has an energy_trace.csv artifact or energy/* metrics")
        return out
    for (dataset, protocol, model), block in energy.groupby(["dataset", "protocol", "model"], sort=True):
        ablate = varying(block, [a for a in axes if a in block.columns])
        curves = descent_curves(block, ablate, cfg)
        curves = curves[curves["n"] > 0]
        if ablate:
            curves["cell"] = curves[ablate].astype(str).agg(", ".join, axis=1)
            legend_title = ", ".join(a.removeprefix("axis.").removeprefix("model.") for a in ablate)
        else:
            curves["cell"] = model
            legend_title = None
        cells = list(dict.fromkeys(curves.sort_values(ablate or ["step"])["cell"]))
        colours = dict(zip(cells, sns.color_palette("viridis", len(cells)) if ablate else
                           [style.model_palette([model])[model]], strict=True))
        fig, axs = style.new_figure(ncols=3, width=style.DOUBLE_COLUMN_IN, height=0.32 * style.DOUBLE_COLUMN_IN)
        for ax, term in zip(axs[0], TERMS, strict=True):
            part = curves[curves["term"] == term]
            for cell in cells:
                g = part[part["cell"] == cell].sort_values("step")
                if g["mean"].notna().sum() == 0:
                    continue
                ax.plot(g["step"], g["mean"], color=colours[cell], label=cell, marker=".")
                ax.fill_between(g["step"].to_numpy(float), g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float),
                                color=colours[cell], alpha=0.2, linewidth=0)
            ax.set_title(TERM_LABEL[term])
            ax.set_xlabel("descent step t")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        axs[0, 0].set_ylabel("energy")
        handles, labels = [], []
        for ax in axs[0]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        sources = set(block["source"])
        over = "samples and seeds" if sources == {"trace"} else "seeds" if sources == {"metrics"} else \
            "samples and seeds (trace) or seeds (energy/* metrics)"
        if "split" in block.columns and block.loc[block["split"] != -1, "split"].nunique() > 1:
            over += " and splits"
        fig.suptitle(f"{model} · {dataset} / {protocol}: mean, 95% CI over {over}")
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(6, len(labels)), frameon=False,
                       title=legend_title)
        out.made.append((f"energy_{dataset}_{protocol}_{model}", fig))
    return out

