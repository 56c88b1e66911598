"""Paper tables from run summaries: Markdown, LaTeX (booktabs via pandas Styler) and CSV.

A results table has one row per grid cell (model × axis values [× split]); each metric shows
"mean ± 95% CI half-width" (Student t below n = 10, BCa bootstrap from it; "(n=1)" or "n=2: no reliable interval"
without an interval, "missing" for a cell with no finished run), the best per column in bold with the metric's
direction, and the cost columns beside it. The caption names dataset, protocol, what was aggregated and
paper-comparability.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from etbench.analysis import references as refs_mod
from etbench.analysis.metrics import COST_COLUMNS, column, higher_is_better, primary_metric, short_name
from etbench.analysis.power import power_columns
from etbench.analysis.stats import DEFAULT_CI, NO_DIFFERENCE, SECONDARY, CIConfig, compare, decide
from etbench.analysis.style import model_order
from etbench.analysis.summary_cache import cached_summarize

MISSING = "missing"
NA_AXIS = "–"
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


@dataclass
class Table:
    """One table: display strings (Markdown), LaTeX strings, a bold mask, the numbers (CSV) and a caption."""

    name: str
    title: str
    caption: str
    display: pd.DataFrame
    latex: pd.DataFrame
    bold: pd.DataFrame
    data: pd.DataFrame


def latex_escape(text: str) -> str:
    """Escape LaTeX specials in plain text; ± becomes $\\pm$."""
    out = "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def fmt_sig(value: float, sig: int = 4) -> str:
    """A number with ``sig`` significant digits."""
    return f"{value:.{sig}g}"


def fmt_cost(value: float) -> str:
    """A cost value: whole numbers from 100 up, else three significant digits."""
    if pd.isna(value):
        return NA_AXIS
    return f"{value:.0f}" if abs(value) >= 100 else fmt_sig(value, 3)


def fmt_mean_ci(mean: float, half: float, n: int, reliable_min_n: int = DEFAULT_CI.reliable_min_n) -> str:
    """"mean ± half" rounded to two significant digits of the half-width; "(n=1)" / "missing" otherwise.

    Without an interval at 2 ≤ n < ``reliable_min_n`` the cell says so ("n=2: no reliable interval") instead of
    a confident-looking ±.
    """
    if n == 0 or pd.isna(mean):
        return MISSING
    if pd.isna(half):
        if 2 <= n < reliable_min_n:
            return f"{fmt_sig(mean)} (n={n}: no reliable interval)"
        return f"{fmt_sig(mean)} (n={n})"
    if half == 0:
        return f"{fmt_sig(mean)} ± 0"
    half = float(f"{abs(half):.2g}")  # two significant digits, then the mean to the same decimal place
    digits = min(8, max(0, 1 - math.floor(math.log10(half))))
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_p(p: float) -> str:
    """A p-value for a table ("–" when no test was possible)."""
    if pd.isna(p):
        return NA_AXIS
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def _axis_label(axis: str) -> str:
    return axis.removeprefix("axis.")


def _comparability(runs: pd.DataFrame) -> str:
    flags = runs["paper_comparable"]
    if (flags == False).any():  # noqa: E712 - object column of True/False/NaN
        return "not paper-comparable (small preset or changed protocol)"
    if flags.isna().any():
        return "paper-comparability unknown (tag missing)"
    return "paper-comparable protocol"


def is_folds(block: pd.DataFrame) -> bool:
    """Graph classification: the block's splits are outer cross-validation folds."""
    return "task" in block.columns and bool((block["task"] == "graphcls").all())


TRAINING_ACCURACY = "TRAINING accuracy (scored graphs were trained on)"
FOLD_NOTE = (
    " Graph classification: one run per outer fold, scored once on the fold's test graphs at the epoch of best "
    "inner-holdout validation accuracy (under 'authors', which has no holdout: the last epoch); n = folds (repeats "
    "× outer folds). '±' is the 95% Student t half-width over folds; 'sd' the standard deviation over folds (ddof "
    "1), the '±' that Errica et al. (ICLR 2020) and the ET paper print. Folds share training graphs, so fold scores "
    "are not independent and the t interval is too narrow (Bengio & Grandvalet, JMLR 2004): read it as a lower "
    "bound on the uncertainty.")
AUTHORS_NOTE = (
    " Protocol 'authors' (the ET authors' evaluation): one model trained on EVERY graph, then scored on folds of "
    "the same graphs, so every number in this table is TRAINING accuracy, not a held-out estimate.")


def fold_columns(display: pd.DataFrame, merged: pd.DataFrame, metrics: Sequence[str], protocol: str) -> pd.DataFrame:
    """A graph classification table's extra columns: sd over folds per metric and what its accuracy measures."""
    display = display.copy()
    for m in metrics:
        display[f"sd ({short_name(m)})"] = [NA_AXIS if pd.isna(v) else fmt_sig(v, 2) for v in merged[f"{m}:std"]]
    display["accuracy is"] = TRAINING_ACCURACY if protocol == "authors" else "held-out (outer test fold)"
    return display


def _over_text(over: str, block: pd.DataFrame) -> str:
    if over == "split" and is_folds(block):
        return "over outer folds, each fold the mean over its seeds"
    if over == "split":
        return "over splits, each split the mean over its seeds"
    return "over seeds, per split" if (block["split"] != -1).any() else "over seeds"


def ci_text(cfg: CIConfig) -> str:
    """How the intervals were computed, for a caption."""
    boot = f"{cfg.n_resamples} resamples, seed {cfg.seed}"
    if cfg.method == "auto":
        text = (f"Student t interval for n < {cfg.bootstrap_min_n}, BCa bootstrap from n = {cfg.bootstrap_min_n} "
                f"({boot})")
    elif cfg.method == "t":
        text = "Student t interval"
    else:
        text = f"bootstrap {cfg.method}, {boot}"
    return f"{text}; no interval for n < {cfg.reliable_min_n}"


def _direction_text(metrics: Sequence[str]) -> str:
    low = [short_name(m) for m in metrics if not higher_is_better(m)]
    high = [short_name(m) for m in metrics if higher_is_better(m)]
    parts = [f"lower is better: {', '.join(low)}" if low else "",
             f"higher is better: {', '.join(high)}" if high else ""]
    return "; ".join(p for p in parts if p)


def _key_columns(block: pd.DataFrame, axes: Sequence[str], over: str) -> tuple[list[str], list[str]]:
    """Axes that vary in this block, and the row keys (model, those axes, split when it matters)."""
    present = [a for a in axes if block[a].notna().any()]
    split = ["split"] if over == "seed" and (block["split"] != -1).any() else []
    return present, ["model", *present, *split]


def _ordered(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(model_order(frame["model"].unique()))}
    frame = frame.assign(_m=frame["model"].map(order))
    return frame.sort_values(["_m", *keys[1:]], kind="stable", na_position="first").drop(columns="_m")


def _to_text(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    text = frame[keys].copy()
    for k in keys:
        text[k] = frame[k].map(lambda v: NA_AXIS if pd.isna(v) else str(v)).astype(object)
    return text.rename(columns={k: _axis_label(k) for k in keys})


def results_tables(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    axes: Sequence[str] = (),
    *,
    over: str = "seed",
    cfg: CIConfig = DEFAULT_CI,
    references: pd.DataFrame | None = None,
) -> list[Table]:
    """One results table per (dataset, protocol) of ``runs``."""
    tables = []
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        present, keys = _key_columns(block, axes, over)
        merged: pd.DataFrame | None = None
        for m in metrics:
            summary = cached_summarize(block, m, present, over=over, cfg=cfg)  # shared with the figures
            summary = summary[[*keys, "mean", "std", "n", "ci_low", "ci_high"]]
            summary = summary.rename(columns={c: f"{m}:{c}" for c in ("mean", "std", "n", "ci_low", "ci_high")})
            merged = summary if merged is None else merged.merge(summary, on=keys, how="outer")
        assert merged is not None
        costs = [c for c in COST_COLUMNS if column(c) in block.columns]
        if costs:
            cost_means = block.groupby(keys, dropna=False)[[column(c) for c in costs]].mean().reset_index()
            merged = merged.merge(cost_means.rename(columns={column(c): c for c in costs}), on=keys, how="left")
        merged = _ordered(merged, keys).reset_index(drop=True)
        display, latex, bold = _format_block(merged, keys, metrics, costs, cfg.reliable_min_n)
        folds = is_folds(block)
        if folds:
            display = fold_columns(display, merged, metrics, str(protocol))
            latex = display.map(latex_escape)
            bold = bold.reindex(columns=display.columns, fill_value=False)
        data = merged.assign(dataset=dataset, protocol=protocol, over=over, source="etbench")
        refs = references if references is not None else refs_mod.load_references(None)
        ref_rows = [refs_mod.matching(refs, block, dataset, protocol, m).assign(metric=m) for m in metrics]
        ref_rows = [r for r in ref_rows if not r.empty]
        notes = []
        if ref_rows:
            display, latex, bold, data, notes = _add_references(pd.concat(ref_rows), display, latex, bold, data)
        n_word = "n = seeds" if over == "seed" else "n = folds" if folds else "n = splits"
        if folds:
            notes = [FOLD_NOTE, *([AUTHORS_NOTE] if protocol == "authors" else []), *notes]
        caption = (
            f"Dataset {dataset}, protocol {protocol}. Mean ± 95% CI half-width {_over_text(over, block)} ({n_word}; "
            f"{ci_text(cfg)}); '{MISSING}' = grid cell without a finished run "
            f"(n = 0); '(n=1)', 'n=2: no reliable interval' = too few runs for an interval. "
            f"Bold: best per column ({_direction_text(metrics)}). "
            f"Costs: mean over the cell's runs; train-step peak mem = GPU allocator peak, or on CPU the peak live "
            f"tensor bytes of the first training step (model state included), not the process RSS. "
            f"Comparability: {_comparability(block)}." + "".join(notes)
        )
        name = f"results_{dataset}_{protocol}_{'per-split' if over == 'seed' else 'over-splits'}"
        title = f"{dataset} / {protocol} — {', '.join(short_name(m) for m in metrics)} ({_over_text(over, block)})"
        title += f" — {TRAINING_ACCURACY}" if folds and protocol == "authors" else ""
        tables.append(Table(name, title, caption, display, latex, bold, data))
    return tables


def _format_block(
    merged: pd.DataFrame, keys: list[str], metrics: Sequence[str], costs: Sequence[str],
    reliable_min_n: int = DEFAULT_CI.reliable_min_n,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Display strings, LaTeX strings and the bold mask of a merged summary."""
    display = _to_text(merged, keys)
    bold = pd.DataFrame(False, index=display.index, columns=display.columns)
    ns = [merged[f"{m}:n"].fillna(0).astype(int) for m in metrics]
    same_n = all((n == ns[0]).all() for n in ns)
    for m, n in zip(metrics, ns, strict=True):
        mean, half = merged[f"{m}:mean"], (merged[f"{m}:ci_high"] - merged[f"{m}:ci_low"]) / 2
        col = short_name(m)
        display[col] = [fmt_mean_ci(a, b, int(c), reliable_min_n) for a, b, c in zip(mean, half, n, strict=True)]
        valid = mean.where(n > 0)
        best = valid.max() if higher_is_better(m) else valid.min()
        bold[col] = (valid == best) & valid.notna()
        if not same_n:
            display[f"n ({col})"] = n.astype(str)
            bold[f"n ({col})"] = False
    if same_n and metrics:
        display["n"] = ns[0].astype(str)
        bold["n"] = False
    for c in costs:
        label, scale = COST_COLUMNS[c]
        display[label] = [fmt_cost(v * scale) for v in merged[c]]
        bold[label] = False
    latex = display.map(latex_escape)
    return display, latex, bold


def _add_references(
    refs: pd.DataFrame, display: pd.DataFrame, latex: pd.DataFrame, bold: pd.DataFrame, data: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """Append published reference rows (never bold) below etbench's own rows."""
    rows, data_rows, notes = [], [], []
    for (label, source), group in refs.groupby(["model", "source"], sort=False):
        row = dict.fromkeys(display.columns, "")
        row[display.columns[0]] = f"{label} [ref]"
        for _, ref in group.iterrows():
            text = fmt_sig(ref["value"]) + ("" if pd.isna(ref["std"]) else f" (sd {fmt_sig(ref['std'])})")
            row[short_name(ref["metric"])] = text
            data_rows.append({"model": label, f"{ref['metric']}:mean": ref["value"],
                              f"{ref['metric']}:std": ref["std"], "source": source})
        rows.append(row)
        notes.append(f" [ref] {label}: published, {source}.")
    extra = pd.DataFrame(rows, columns=display.columns)
    display = pd.concat([display, extra], ignore_index=True)
    latex = pd.concat([latex, extra.map(latex_escape)], ignore_index=True)
    bold = pd.concat([bold, pd.DataFrame(False, index=extra.index, columns=bold.columns)], ignore_index=True)
    data = pd.concat([data, pd.DataFrame(data_rows)], ignore_index=True)
    return display, latex, bold, data, notes


def comparison_tables(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    axes: Sequence[str] = (),
    *,
    reference: str = "et",
    over: str = "seed",
    cfg: CIConfig = DEFAULT_CI,
    alpha: float = 0.05,
    power: float = 0.8,
    margins: Mapping[str, float] | None = None,
    primary: str | None = None,
) -> list[Table]:
    """One table per (dataset, protocol): ``reference`` − each baseline, paired, with CI, effect size and
    p-values. The paired-t p of the ``primary`` metric (default: the task's,
    :data:`etbench.analysis.metrics.PRIMARY_METRIC`) are Holm-adjusted across baselines (one family), and
    "favours" names a model only when the adjusted p < ``alpha``; the other metrics' rows are descriptive (raw p,
    no verdict). Beside each "no difference shown" the minimum detectable effect at ``power``
    (:mod:`etbench.analysis.power`); for metrics with an equivalence margin in ``margins`` (metric name → margin
    in its units), the TOST verdict."""
    tables = []
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        present, keys = _key_columns(block, axes, over)
        parts = [compare(block, m, present, reference=reference, over=over, cfg=cfg, alpha=alpha) for m in metrics]
        parts = [p for p in parts if not p.empty]
        if not parts:
            continue
        main = primary or primary_metric(block, metrics)
        data = pd.concat(parts, ignore_index=True)
        data = decide(data, alpha, family=(data["metric"] == main).tolist())  # Holm family: the primary's rows
        data = power_columns(data, alpha, power, margins)
        row_keys = [k for k in keys if k != "model" and k in data.columns]
        display = _to_text(data, ["metric", *row_keys, "baseline"])
        display["metric"] = data["metric"].map(short_name)
        display["n pairs"] = data["n"].astype(int).astype(str)
        half = (data["ci_high"] - data["ci_low"]) / 2
        display[f"Δ ({reference} − baseline)"] = [
            fmt_mean_ci(a, b, int(c), cfg.reliable_min_n)
            for a, b, c in zip(data["mean_diff"], half, data["n"], strict=True)
        ]
        display["d_z (paired)"] = data["d_z"].map(lambda v: NA_AXIS if pd.isna(v) else f"{v:.2f}")
        display["p (paired t)"] = data["p_ttest"].map(fmt_p)
        display["p (Holm)"] = data["p_holm"].map(fmt_p)
        display["p (Wilcoxon, n≥6)"] = data["p_wilcoxon"].map(fmt_p)
        display["favours"] = data["favours"]
        display[f"MDE ({power:.0%} power)"] = [_mde_text(r) for _, r in data.iterrows()]
        with_margin = bool(data["margin"].notna().any())
        if with_margin:
            display["TOST (equivalence)"] = [_tost_text(r) for _, r in data.iterrows()]
        bold = pd.DataFrame(False, index=display.index, columns=display.columns)
        family = len(data["p_holm"].dropna())
        caption = (
            f"Dataset {dataset}, protocol {protocol}. Paired differences {reference} − baseline, matched by seed "
            f"and split and equal axis values, {_over_text(over, block)}: mean ± 95% CI half-width "
            f"({ci_text(cfg)}), paired effect size d_z = mean/sd of the differences, paired t-test p, "
            f"Holm-adjusted paired-t p over the {family} comparisons of the primary metric "
            f"{short_name(main)} (one family across baselines), Wilcoxon signed-rank p (only n ≥ 6). 'favours' "
            f"names the better model ({_direction_text(metrics)}) only when the Holm p < {alpha:g}; otherwise "
            f"'{NO_DIFFERENCE}', with the minimum detectable effect (MDE): the smallest |Δ| "
            f"the two-sided paired t-test at α = {alpha:g} detects with {power:.0%} power at this n (exact, noncentral "
            f"t; d_z, and metric units via the observed sd of the differences; larger still at the Holm level)."
            + (f" Secondary metrics are descriptive: raw p only, no Holm p and no verdict ('{SECONDARY}')."
               if (data["metric"] != main).any() else "")
            + (f" TOST: two one-sided paired t-tests at α = {alpha:g} (not Holm-adjusted) against the declared "
               f"equivalence margin ±δ; 'equivalent' when both reject." if with_margin else "")
            + f" Comparability: {_comparability(block)}."
        )
        name = f"compare_{dataset}_{protocol}_{'per-split' if over == 'seed' else 'over-splits'}"
        title = f"{dataset} / {protocol} — {reference} vs baselines ({_over_text(over, block)})"
        tables.append(Table(name, title, caption, display, display.map(latex_escape), bold, data))
    return tables


def _mde_text(row: pd.Series) -> str:
    """The MDE beside a "no difference shown" ("–" beside any other verdict)."""
    if row["favours"] != NO_DIFFERENCE or pd.isna(row["mde_dz"]):
        return NA_AXIS
    units = "" if pd.isna(row["mde"]) else f"{row['mde']:.2g}, "
    return f"{units}d_z {row['mde_dz']:.2f}"


def _tost_text(row: pd.Series) -> str:
    """The TOST verdict of a row whose metric has a margin ("–" without a margin or a test)."""
    if pd.isna(row["p_tost"]):
        return NA_AXIS
    word = "equivalent" if row["equivalent"] else "not shown equivalent"
    return f"{word} within ±{row['margin']:.2g} (p {fmt_p(row['p_tost'])})"


def to_markdown(table: Table) -> str:
    """The table as a Markdown section: title, caption, pipe table with bold best values."""
    cells = table.display.astype(str).where(~table.bold, "**" + table.display.astype(str) + "**")
    header = [str(c) for c in cells.columns]
    lines = [f"### {table.title}", "", table.caption, "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", r"\|") for v in row) + " |" for row in cells.to_numpy()]
    return "\n".join(lines) + "\n"


#: A table of more rows than this is a ``longtable`` (breaks across pages, header repeated) instead of a float.
FLOAT_MAX_ROWS = 30
#: Font size by the table's estimated width in characters (a booktabs row of the widest cells): a table that
#: would not fit the text width in a smaller size is set on a landscape page (``lscape``).
LATEX_SIZES = ((80, r"\small"), (92, r"\footnotesize"), (104, r"\scriptsize"))  # calibrated: 5.5 in text
LATEX_PACKAGES = ("booktabs", "longtable", "lscape")  # what a document needs to \input these tables


HEADER_LINE_CHARS = 12


def header_lines(label: str, width: int = HEADER_LINE_CHARS) -> list[str]:
    """A column label broken at spaces into lines of about ``width`` characters (a long header stacks)."""
    lines: list[str] = []
    for word in label.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [label]


def _stacked(label: str) -> str:
    lines = header_lines(label)
    return lines[0] if len(lines) == 1 else "\\begin{tabular}[b]{@{}l@{}}" + " \\\\ ".join(lines) + "\\end{tabular}"


def latex_width_chars(frame: pd.DataFrame) -> int:
    """Estimated width of a table in characters: per column its widest cell or header line, plus two for the gap."""
    def visible(text: str) -> int:
        return len(text.replace("$\\pm$", "±").replace("\\", "").replace("$", ""))

    widths = [max([visible(line) for line in header_lines(str(c))] + [visible(str(v)) for v in frame[c]])
              for c in frame.columns]
    return sum(widths) + 2 * len(widths)


def to_latex(table: Table) -> str:
    """The table in booktabs LaTeX (pandas Styler, ``hrules=True``), best values in \\textbf: a float up to
    ``FLOAT_MAX_ROWS`` rows, else a ``longtable`` that breaks across pages with its header repeated; the font
    shrinks with the width, and a table wider than ``\\scriptsize`` allows is set landscape."""
    frame = table.latex.copy()
    frame.columns = [latex_escape(str(c)) for c in frame.columns]
    chars = latex_width_chars(frame)
    bold = table.bold.copy()
    frame.columns = [_stacked(c) for c in frame.columns]
    bold.columns = frame.columns
    styler = frame.style.hide(axis="index").apply(
        lambda col: np.where(bold[col.name], "textbf:--rwrap;", ""), axis=0
    )
    size = next((cmd for limit, cmd in LATEX_SIZES if chars <= limit), r"\scriptsize")
    landscape = chars > LATEX_SIZES[-1][0]
    if len(frame) <= FLOAT_MAX_ROWS:
        body = styler.to_latex(hrules=True, caption=latex_escape(table.caption), label=f"tab:{table.name}",
                               position_float="centering", column_format="l" * frame.shape[1])
        body = body.replace("\\centering\n", f"\\centering\n{size}\n", 1)
    else:
        body = styler.to_latex(hrules=True, caption=latex_escape(table.caption), label=f"tab:{table.name}",
                               environment="longtable", column_format="l" * frame.shape[1])
        body = f"\\begingroup\n{size}\n\\setlength{{\\tabcolsep}}{{3pt}}\n{body}\\endgroup\n"
    return f"\\begin{{landscape}}\n{body}\\end{{landscape}}\n" if landscape else body


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv")]
    paths[0].write_text(to_markdown(table))
    paths[1].write_text(to_latex(table))
    table.data.to_csv(paths[2], index=False)
    return paths
