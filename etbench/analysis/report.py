"""``make_report``: everything for one grid (experiment) — tables, figures, artifact images and an index.

Output layout under ``out``::

    README.md           what was produced, what was skipped and why, which runs were left out
    index.html          the same as one page to open in a browser, offline: the README's notes and tables, every
                        table file, every figure and image embedded with its caption, links to the CSV/LaTeX/PDF
                        files (etbench.analysis.html_report; written last, from the files in this folder)
    runs.csv            the analysed runs (tags, axes, params, metrics); excluded_runs.csv with reasons
    tables/             results_* and compare_* tables as .md, .tex (booktabs) and .csv
    figures/            steps_*, terms_*, memory_*, pareto_*, energy_* as .pdf and .png; scaling_* (a grid with a
                        width axis: metric vs training FLOPs / params / seconds) with its points as .csv
    images/             reconstruction.png / memories.png of the best run per (dataset, protocol, model)
    .etbench-report.json  the files written and the fingerprint of their inputs: a report of unchanged runs,
                        options and analysis code into the same folder keeps them instead of redrawing
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from etbench.analysis import aggregate, best_lr, descent, diagnostics, figures, scaling, tables
from etbench.analysis.cache import RunCache, energy_frame
from etbench.analysis.html_report import INDEX_HTML, write_html_report
from etbench.analysis.load import client_for, load_runs
from etbench.analysis.margins import declared_margins, for_metrics
from etbench.analysis.metrics import choose_metrics, column, higher_is_better, primary_metric, short_name
from etbench.analysis.references import load_references
from etbench.analysis.stats import DEFAULT_CI, CIConfig
from etbench.analysis.style import save_checked

IMAGE_ARTIFACTS = ("reconstruction.png", "memories.png")
FIGURE_FAMILIES: dict[str, Callable[..., figures.FigureSet]] = {
    "steps": figures.steps_figures,
    "terms": figures.terms_figures,
    "memory": figures.memory_heatmaps,
    "pareto": figures.pareto_figures,
}


@dataclass
class ReportResult:
    """What ``make_report`` wrote."""

    out: Path
    index: Path
    runs_csv: Path
    n_runs: int
    metrics: dict[str, list[str]]
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    excluded: pd.DataFrame = field(default_factory=pd.DataFrame)
    titles: dict[str, str] = field(default_factory=dict)  # figure file stem → its title (one line)
    html: Path | None = None  # index.html: the report as one self-contained page
    margins: dict[str, float] = field(default_factory=dict)  # equivalence margins of the TOST column (metric → δ)
    margins_source: str = ""  # where they came from: given to the report, or the grid's parent run(s)


def _splits_vary(block: pd.DataFrame) -> bool:
    return figures.summary_over(block) == "split"


def make_report(
    experiment: str,
    tracking_uri: str | None,
    out: Path,
    *,
    include_failed: bool = False,
    cache_dir: Path | None = None,
    metrics: Sequence[str] | None = None,
    reference_model: str = "et",
    references: Path | None = None,
    ci: CIConfig = DEFAULT_CI,
    margins: Mapping[str, float] | None = None,
    progress: Callable[[str], None] = print,
) -> ReportResult:
    """Build the full report of ``experiment`` into ``out``.

    ``metrics`` overrides the headline metrics (default: per task, those logged among best/test/*);
    figures use the first. ``cache_dir`` (default ``out/.etbench-cache``) keeps downloaded artifacts and
    metric histories per run. ``references`` is a reference_results.yaml to set published numbers beside ours.
    ``margins`` (metric → equivalence margin in its units; a full name such as ``best/test/mse_masked`` or the
    logged name ``mse_masked``) adds a TOST column to the comparison tables; left at None, the margins the grid
    declared (``analysis: {equivalence_margins: ...}``, recorded on its parent run) are used; ``{}``: none.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress(f"[report] loading runs of experiment {experiment!r}")
    client = client_for(tracking_uri)
    table = load_runs(experiment, tracking_uri, include_failed=include_failed, client=client, progress=progress)
    runs, axes = table.runs, table.axes
    from etbench.analysis import tuning_report

    tuned_grid = "stage" in runs.columns and bool(runs["stage"].notna().any())  # only then ask MLflow for stages
    finals = tuning_report.final_run_ids(client, experiment) if tuned_grid else None  # comparisons: final runs only
    if finals is not None:  # runs without a stage (an untuned grid of the same experiment) are compared too
        runs = runs[runs["run_id"].isin(finals) | runs["stage"].isna()].reset_index(drop=True)
    runs, axes = folds_as_splits(runs, axes)
    progress(f"[report] {len(runs)} runs analysed, {len(table.excluded)} left out; axes: {axes or 'none'}")
    if runs.empty:
        reasons = table.excluded["reason"].value_counts().head(5).to_dict()
        left = len(table.excluded)
        from etbench.analysis import AnalysisError

        raise AnalysisError(f"experiment {experiment!r} has no analysable runs ({left} left out: {reasons})")
    cache = RunCache(client, Path(cache_dir) if cache_dir is not None else out / ".etbench-cache")
    refs = load_references(references)
    margins, margins_source = _margins(client, experiment, margins)
    result = ReportResult(out=out, index=out / "README.md", runs_csv=out / "runs.csv", n_runs=len(runs), metrics={},
                          excluded=table.excluded, margins=margins, margins_source=margins_source)
    runs.to_csv(result.runs_csv, index=False)
    table.excluded.to_csv(out / "excluded_runs.csv", index=False)
    every = int(pd.util.hash_pandas_object(table.runs[["run_id", "status", "end_time"]], index=False).sum())
    fingerprint = _fingerprint(out, experiment, tracking_uri, include_failed, metrics, reference_model, every,
                               ci, sorted(margins.items()), margins_source, references)  # references last
    kept = _unchanged(out, fingerprint, result)
    if kept is not None:
        progress(f"[report] nothing changed since the report already in {out} (same runs, options and analysis "
                 f"code): kept its {len(kept.tables)} table and {len(kept.figures)} figure files")
        kept.html = out / INDEX_HTML if (out / INDEX_HTML).exists() else write_html_report(out)
        return kept
    _drop_previous(out)
    sections: list[str] = []
    for task, block in runs.groupby("task", sort=True):
        chosen = choose_metrics(block, metrics)
        result.metrics[str(task)] = chosen
        if not chosen:
            result.skipped.append(f"{task}: no headline metric (best/test/*) logged; no tables or figures")
            continue
        progress(f"[report] {task}: metrics {chosen}")
        sections += _tables(block, chosen, axes, reference_model, ci, refs, out / "tables", result, progress,
                            for_metrics(chosen, margins))
        _figures(block, chosen[0], axes, ci, out / "figures", result, progress)
        sections += _scaling(block, primary_metric(block, chosen), axes, ci, out, result)
        _images(block, chosen[0], cache, out / "images", result)
        sections += _best_lr_view(block, chosen, axes, reference_model, ci, out, result, progress,
                                  for_metrics(chosen, margins))
    progress("[report] energy descent")
    energy_runs = runs[runs["model"] == reference_model]
    keep = ["dataset", "protocol", "model", "seed", "split", *axes]
    energy = energy_frame(energy_runs, cache, keep=keep) if not energy_runs.empty else pd.DataFrame()
    made = descent.energy_figures(energy, axes, sink=_sink(out / "figures", result))
    _save_figures(made, out / "figures", result)
    made = diagnostics.diagnostics_figures(energy, axes, sink=_sink(out / "figures", result))
    _save_figures(made, out / "figures", result)
    tuned = tuning_report.write_tuning_report(client, experiment, out) if finals is not None else None
    if tuned is not None:
        result.tables += tuned.tables
        result.figures += tuned.figures
        sections.insert(0, tuned.section)
    else:
        sections.insert(0, tuning_report.UNTUNED_NOTE)
    result.index.write_text(_index(experiment, tracking_uri, result, sections))
    _write_manifest(out, fingerprint, result)
    result.html = write_html_report(out)  # last: the page shows what the folder holds
    for warning in result.warnings:
        progress(f"[report] warning: {warning}")
    progress(f"[report] wrote {len(result.tables)} table files, {len(result.figures)} figure files, "
             f"{len(result.images)} images; skipped {len(result.skipped)} (see {result.index}, or open "
             f"{result.html} in a browser)")
    return result


def _margins(client: object, experiment: str, given: Mapping[str, float] | None) -> tuple[dict[str, float], str]:
    """The equivalence margins of the report and where they come from: ``given``, else those the grid declared
    (tag ``etbench.analysis.margins`` of the experiment's parent runs, :mod:`etbench.analysis.margins`)."""
    if given is not None:
        return {str(k): float(v) for k, v in sorted(given.items())}, "given to the report"
    declared, parents = declared_margins(client, experiment)
    if not declared:
        return {}, "none declared by the grid"
    return declared, f"declared by the grid (analysis.equivalence_margins; parent run {', '.join(parents)})"


FOLD_AXES = ("axis.task.fold", "axis.task.repeat", "axis.task.dataset")  # the last one is the dataset column


def folds_as_splits(runs: pd.DataFrame, axes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Graph classification runs with their outer fold as the ``split`` replicate (repeat × n_folds + fold, from the
    logged ``task.fold`` / ``task.repeat`` params), so the tables and comparisons aggregate folds the way they
    aggregate a graph task's stored splits (n = folds, folds paired across models); a fold or repeat axis is then
    no grid cell key, nor a dataset axis (the dataset column already says it). Other runs are returned unchanged."""
    graphcls = runs["task"] == "graphcls" if "task" in runs.columns else pd.Series(False, index=runs.index)
    if not graphcls.any():
        return runs, list(axes)
    from etbench.tasks.graphcls_folds import N_FOLDS

    missing = [c for c in ("params.task.fold", "params.task.repeat") if c not in runs.columns]
    if missing:
        raise ValueError(f"graph classification runs lack the logged param(s) {missing}: cannot tell their folds")
    fold = pd.to_numeric(runs.loc[graphcls, "params.task.fold"], errors="raise").astype(int)
    repeat = pd.to_numeric(runs.loc[graphcls, "params.task.repeat"], errors="raise").astype(int)
    runs = runs.copy()
    runs["split"] = runs["split"].astype(object)
    runs.loc[graphcls, "split"] = repeat * N_FOLDS + fold
    runs["split"] = pd.to_numeric(runs["split"]).astype(int)
    return runs, [a for a in axes if a not in FOLD_AXES]


MANIFEST = ".etbench-report.json"


def _fingerprint(out: Path, *options: object) -> str:
    """Hash of everything a report depends on: the analysed and excluded runs as just written (every tag, param,
    metric, status and end time), the options, the references file, the analysis code and plotting libraries."""
    from importlib import metadata

    h = hashlib.sha256()
    for name in ("runs.csv", "excluded_runs.csv"):
        h.update((out / name).read_bytes())
    h.update(json.dumps([str(o) for o in options]).encode())
    refs = options[-1]
    if refs is not None and Path(str(refs)).is_file():
        h.update(Path(str(refs)).read_bytes())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    h.update(json.dumps([metadata.version(p) for p in ("matplotlib", "seaborn", "pandas", "scipy")]).encode())
    return h.hexdigest()


def _unchanged(out: Path, fingerprint: str, fresh: ReportResult) -> ReportResult | None:
    """The previous report in ``out`` when it was made from exactly these inputs and all its files still exist."""
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    lists = {k: [out / p for p in saved.get(k, [])] for k in ("tables", "figures", "images")}
    if saved.get("fingerprint") != fingerprint or not fresh.index.exists() or \
            not all(p.exists() for paths in lists.values() for p in paths):
        return None
    return ReportResult(out=out, index=fresh.index, runs_csv=fresh.runs_csv, n_runs=fresh.n_runs,
                        metrics=saved["metrics"], skipped=saved["skipped"], warnings=saved["warnings"],
                        excluded=fresh.excluded, titles=saved["titles"], margins=saved.get("margins", {}),
                        margins_source=saved.get("margins_source", ""), **lists)


def _drop_previous(out: Path) -> None:
    """Remove the files an earlier report in ``out`` listed, so the new README lists exactly what is on disk."""
    path = out / MANIFEST
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        saved = {}
    for key in ("tables", "figures", "images"):
        for name in saved.get(key, []):
            (out / name).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _write_manifest(out: Path, fingerprint: str, result: ReportResult) -> None:
    """What this report wrote, under the fingerprint of its inputs (read back by ``_unchanged``)."""
    def rel(paths: list[Path]) -> list[str]:
        return [str(Path(p).relative_to(out)) for p in paths]

    (out / MANIFEST).write_text(json.dumps({
        "fingerprint": fingerprint, "metrics": result.metrics, "skipped": result.skipped,
        "warnings": result.warnings, "titles": result.titles, "tables": rel(result.tables),
        "figures": rel(result.figures), "images": rel(result.images), "margins": result.margins,
        "margins_source": result.margins_source}, indent=1))


def _tables(block: pd.DataFrame, chosen: list[str], axes: list[str], reference: str, ci: CIConfig,
            refs: pd.DataFrame, folder: Path, result: ReportResult, progress: Callable[[str], None],
            margins: Mapping[str, float] | None = None) -> list[str]:
    """Results and comparison tables, per split and (graph protocols with stored splits) over splits."""
    sections = []
    views = ("seed", "split") if _splits_vary(block) else ("seed",)
    if tables.is_folds(block):  # graph classification: folds are the replicates (one run each), a t interval
        views, ci = ("split",), replace(ci, method="t")  # over them (see tables.FOLD_NOTE), no per-fold tables
    for over in views:
        progress(f"[report]   tables over {over}s")
        made = tables.results_tables(block, chosen, axes, over=over, cfg=ci, references=refs)
        made += tables.comparison_tables(block, chosen, axes, reference=reference, over=over, cfg=ci,
                                         margins=margins)
        for t in made:
            result.tables += tables.write_table(t, folder)
            sections.append(tables.to_markdown(t))
    if tables.is_folds(block):  # training accuracy ('authors') is no task to pool with held-out scores
        block = block[block["protocol"] != "authors"]
    if len(block[["dataset", "protocol"]].drop_duplicates()) >= 2:  # IQM + P(improvement) across datasets
        progress("[report]   aggregates across datasets")
        made, notes = aggregate.aggregate_tables(block, chosen, axes, task=str(block["task"].iloc[0]),
                                                 reference=reference, cfg=aggregate.AggregateConfig(seed=ci.seed))
        result.skipped += notes
        for t in made:
            result.tables += tables.write_table(t, folder)
            sections.append(tables.to_markdown(t))
    return sections


def _best_lr_view(block: pd.DataFrame, chosen: list[str], axes: list[str], reference: str, ci: CIConfig, out: Path,
                  result: ReportResult, progress: Callable[[str], None],
                  margins: Mapping[str, float] | None = None) -> list[str]:
    """A grid with a learning-rate axis: each cell at the lr of its best mean validation primary metric
    (:mod:`etbench.analysis.best_lr`): the selection table, then results and comparison tables and the figure
    families of the chosen runs, named ``…_lr-best-val``; the Markdown of the tables for the README."""
    present = [a for a in axes if a in block.columns and block[a].notna().any()]
    lr = best_lr.lr_axis(block, present)
    if lr is None:
        return []
    main = primary_metric(block, chosen)
    val = best_lr.validation_metric(main)
    task = str(block["task"].iloc[0])
    if val is None or column(val) not in block.columns or block[column(val)].isna().all():
        result.skipped.append(f"{task}: no {val or 'validation metric'} logged to choose {lr} per cell by: no "
                              f"best-validation-lr view")
        return []
    others = [a for a in present if a != lr]
    keys = ["dataset", "protocol", "model", *others]
    higher = higher_is_better(main)
    picked = best_lr.best_value_runs(block, lr, keys, val, higher)
    progress(f"[report]   each cell at its best-validation {lr} ({short_name(val)})")
    sections: list[str] = []
    for (dataset, protocol), part in block.groupby(["dataset", "protocol"], sort=True):
        made = best_lr.selection_table(part, lr, keys, val, higher, str(dataset), str(protocol))
        result.tables += tables.write_table(made, out / "tables")
        sections.append(tables.to_markdown(made))
    choice = best_lr.chosen_values(picked, lr, keys)
    views = ("seed", "split") if _splits_vary(picked) else ("seed",)
    if tables.is_folds(picked):
        views, ci = ("split",), replace(ci, method="t")
    note = f"each cell at the {_axis_name(lr)} of its best mean {short_name(val)}"
    for over in views:
        made_tables = tables.results_tables(picked, chosen, others, over=over, cfg=ci)
        made_tables += tables.comparison_tables(picked, chosen, others, reference=reference, over=over, cfg=ci,
                                                margins=margins)
        for t in made_tables:
            t = _at_best_lr(t, lr, choice, keys, note)
            result.tables += tables.write_table(t, out / "tables")
            sections.append(tables.to_markdown(t))
    sink = _sink(out / "figures", result)

    def put(name: str, fig: Figure) -> None:
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        fig.suptitle(f"{title}\n{note}" if title else note)
        sink(name + best_lr.SUFFIX, fig)

    for make in FIGURE_FAMILIES.values():
        made_figures = make(picked, chosen[0], others, ci, sink=put)
        for name, fig in made_figures.made:
            put(name, fig)
        for name, frame in made_figures.tables:
            path = out / "tables" / f"{name}{best_lr.SUFFIX}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(path, index=False)
            result.tables.append(path)
        result.skipped += [f"{note}: {s}" for s in made_figures.skipped]
    return sections


def _axis_name(axis: str) -> str:
    return axis.removeprefix("axis.")


def _at_best_lr(t: tables.Table, lr: str, choice: pd.DataFrame, keys: list[str], note: str) -> tables.Table:
    """A table of the best-validation-lr view: named ``…_lr-best-val``, its title and caption say so, and a results
    table shows each row's chosen lr."""
    caption = f"{t.caption} Learning rate: {note} (tables/lr_selection_*)."
    display, latex, bold, data = t.display.copy(), t.latex.copy(), t.bold.copy(), t.data.copy()
    if t.name.startswith("results_") and all(k in data.columns for k in keys):
        values = data[keys].merge(choice, on=keys, how="left")[lr]
        label = f"{_axis_name(lr)} (best val)"
        data[f"chosen {lr}"] = values.to_numpy()
        text = ["" if pd.isna(v) else tables.fmt_sig(float(v)) for v in values]
        display.insert(1, label, text)
        latex.insert(1, label, [tables.latex_escape(v) for v in text])
        bold.insert(1, label, False)
    return tables.Table(t.name + best_lr.SUFFIX, f"{t.title} — {note}", caption, display, latex, bold, data)


def _sink(folder: Path, result: ReportResult) -> figures.Sink:
    """Save, check and close each figure the moment it is drawn; a second figure under a name already written is
    an error, never an overwrite."""

    def put(name: str, fig: Figure) -> None:
        if name in result.titles:
            plt.close(fig)
            raise RuntimeError(f"two report figures are both named {name!r}; figure names must keep every axis value")
        title = fig._suptitle.get_text() if fig._suptitle is not None else ""
        result.titles[name] = " · ".join(line for line in title.splitlines() if line)
        paths, problems = save_checked(fig, folder / name)
        result.figures += paths
        result.warnings += [f"figure {name}: {problem}" for problem in problems]

    return put


def _save_figures(made: figures.FigureSet, folder: Path, result: ReportResult) -> None:
    """What a family left besides its (already saved) figures: skips, and the data tables behind figures."""
    put = _sink(folder, result)
    for name, fig in made.made:
        put(name, fig)
    for name, frame in made.tables:
        path = folder.parent / "tables" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        result.tables.append(path)
    result.skipped += made.skipped


def _figures(block: pd.DataFrame, metric: str, axes: list[str], ci: CIConfig, folder: Path, result: ReportResult,
             progress: Callable[[str], None]) -> None:
    for family, make in FIGURE_FAMILIES.items():
        progress(f"[report]   figures: {family}")
        _save_figures(make(block, metric, axes, ci, sink=_sink(folder, result)), folder, result)


def _scaling(block: pd.DataFrame, metric: str, axes: list[str], ci: CIConfig, out: Path,
             result: ReportResult) -> list[str]:
    """Width-scaling figures (with their points as CSV beside each) and the fitted-slope table
    (``etbench.analysis.scaling``); the table's Markdown for the README."""
    made = scaling.scaling_figures(block, metric, axes, ci, sink=_sink(out / "figures", result))
    for name, frame in made.points:
        path = out / "figures" / f"{name}.csv"
        frame.to_csv(path, index=False)
        result.figures.append(path)
    result.skipped += made.figures.skipped
    if made.fit is None:
        return []
    result.tables += tables.write_table(made.fit, out / "tables")
    return [tables.to_markdown(made.fit)]


def _images(block: pd.DataFrame, metric: str, cache: RunCache, folder: Path, result: ReportResult) -> None:
    """Copy reconstruction/memory images of the best run (by ``metric``) per (dataset, protocol, model)."""
    value = column(metric)
    for (dataset, protocol, model), group in block.groupby(["dataset", "protocol", "model"], sort=True):
        scored = group[group[value].notna()] if value in group.columns else group.iloc[0:0]
        if scored.empty:
            continue
        best = scored.sort_values(value, ascending=not higher_is_better(metric), kind="stable").iloc[0]
        names = set(cache.artifact_names(best))
        for name in IMAGE_ARTIFACTS:
            if name not in names:
                if block["task"].iloc[0] == "image" and (name != "memories.png" or model == "et"):
                    run_id = best["run_id"]
                    result.skipped.append(f"image: {dataset}/{protocol}/{model} best run {run_id} has no {name}")
                continue
            local = cache.artifact(best, name)
            assert local is not None
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{dataset}_{protocol}_{model}_{str(best['run_id'])[:8]}_{name}"
            shutil.copyfile(local, target)
            result.images.append(target)


def _margins_text(result: ReportResult) -> str:
    shown = ", ".join(f"{m} ±{d:g}" for m, d in result.margins.items())
    return f"{shown} ({result.margins_source})" if shown else result.margins_source or "none"


def _index(experiment: str, tracking_uri: str | None, result: ReportResult, sections: list[str]) -> str:
    """README.md of the report: provenance, tables inline, lists of figures, images, skips and exclusions."""
    runs = result.n_runs
    lines = [f"# etbench report: {experiment}", "", f"- tracking URI: {tracking_uri or '(MLflow default)'}",
             f"- runs analysed: {runs}; left out: {len(result.excluded)} (see excluded_runs.csv)",
             f"- headline metrics: {result.metrics}", f"- equivalence margins (TOST): {_margins_text(result)}", ""]
    if len(result.excluded):
        lines += ["## Runs left out", ""]
        lines += [f"- {reason}: {count}" for reason, count in result.excluded["reason"].value_counts().items()]
        lines.append("")
    lines += ["## Tables", "", *sections, "## Figures", ""]
    files: dict[str, list[str]] = {}
    for p in result.figures:
        files.setdefault(p.name.rsplit(".", 1)[0], []).append(f"figures/{p.name}")
    lines += [f"- {', '.join(paths)}: {result.titles.get(stem, '')}" for stem, paths in files.items()]
    lines += ["", "## Images from the runs", ""] + [f"- images/{p.name}" for p in result.images]
    lines += ["", "## Skipped", ""] + [f"- {s}" for s in result.skipped]
    if result.warnings:
        lines += ["", "## Layout warnings (labels overlapping or cut off)", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"
