"""Reports at scale: figure names that keep every axis value, slices that hold exactly their cell's runs, the
fast readers (SQL run table, trace cache, dedup lookup) against MLflow's own API, and the generated stores
against a real tracked run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from etbench.analysis import figures
from etbench.analysis.report import make_report
from etbench.testing.report_store import StoreShape, generate_store

MSE = "best/test/mse_masked"
STEPS = "axis.model.steps"
MEM = "axis.model.memories"
LRS = (0.0005, 0.001, 0.002)


@pytest.fixture(scope="module")
def lr_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """et + vit × steps {1, 4} × lr {0.0005, 0.001, 0.002} × 2 seeds (24 runs), generated."""
    dest = tmp_path_factory.mktemp("lr_store") / "store"
    return generate_store(dest, StoreShape((1, 4), (), LRS, (0, 1), epochs=3, trace_samples=4), name="lr-grid",
                          progress=lambda s: None)


def test_lr_grid_writes_one_figure_per_lr_named_like_its_title(lr_store: dict, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = make_report(lr_store["experiment"], lr_store["tracking_uri"], out, progress=lambda s: None)
    steps = sorted(p.name for p in (out / "figures").glob("steps_*.pdf"))
    best = "steps_digits_masked-completion_mse_masked_lr-best-val.pdf"  # each cell at its best val lr (27.7)
    assert steps == sorted([f"steps_digits_masked-completion_mse_masked_lr-{lr!r}.pdf" for lr in LRS] + [best])
    on_disk = sorted(p.name for p in (out / "figures").iterdir())
    readme = result.index.read_text()
    listed = sorted(name for line in readme.splitlines() if line.startswith("- figures/")
                    for name in re.findall(r"figures/(\S+?\.(?:pdf|png))", line))
    assert listed == on_disk and len(on_disk) == len(result.figures) == len(set(result.figures))
    for line in readme.splitlines():
        if line.startswith("- figures/steps_") and "_lr-best-val." in line:
            assert "each cell at the train.lr of its best mean val mse_masked" in line.split(": ", 1)[1], line
        elif line.startswith("- figures/steps_"):
            named = re.search(r"_lr-([0-9.e-]+)\.pdf", line).group(1)
            titled = re.search(r"lr=([0-9.e-]+)", line.split(": ", 1)[1]).group(1)
            assert named == titled, line


def _zigzag_frame() -> pd.DataFrame:
    """et over steps × memories {64, 256} and vit over steps (no memories axis), 3 seeds, one dataset."""
    rows = []
    for model, mems in (("et", (64, 256)), ("vit", (None,))):
        for mem in mems:
            for steps in (1, 2, 4):
                for seed in range(3):
                    mse = 0.1 / steps + (0.05 if mem == 64 else 0.0) + (0.2 if model == "vit" else 0) + 0.001 * seed
                    rows.append({"model": model, STEPS: steps, MEM: mem, "seed": seed, "metrics." + MSE: mse})
    frame = pd.DataFrame(rows).assign(dataset="d", protocol="p", task="image", split=-1, paper_comparable=False)
    frame[["split", "seed", STEPS, MEM]] = frame[["split", "seed", STEPS, MEM]].astype("Int64")
    return frame


def test_each_steps_figure_holds_exactly_its_cells_runs() -> None:
    made = figures.steps_figures(_zigzag_frame(), MSE, [MEM, STEPS])
    names = [n for n, _ in made.made]
    assert names == [f"steps_d_p_mse_masked_memories-{m}" for m in (64, 256)]  # no slice "without memories"
    for (name, fig), mem in zip(made.made, (64, 256), strict=True):
        ax = fig.axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"et", "vit"}
        for label, line in lines.items():
            x = list(line.get_xdata())
            assert x == [1.0, 2.0, 4.0], (name, label, x)  # one point per T: no zigzag through other cells
        want = 0.1 / np.array([1, 2, 4]) + (0.05 if mem == 64 else 0.0) + 0.001
        np.testing.assert_allclose(lines["et"].get_ydata(), want)
    import matplotlib.pyplot as plt

    for _, fig in made.made:
        plt.close(fig)
    table = _zigzag_frame()
    for fixed, part in figures._slices(table, [MEM]):
        assert set(part[MEM].dropna()) == {fixed[MEM]} and set(part.loc[part[MEM].isna(), "model"]) == {"vit"}


def test_file_names_are_exact_and_distinct() -> None:
    assert figures.value_text(0.0005) == "0.0005" and figures.value_text(np.float64(1e-05)) == "1e-05"
    assert figures.file_part("attn+hn") == "attn+hn" and figures.file_part("a/b c") == "a%2Fb%20c"
    assert figures.file_part("a b") != figures.file_part("a_b")
    assert figures.rest_label({"axis.model.steps": 4, "axis.train.steps": 2}) == "model.steps=4, train.steps=2"


def test_sql_reader_gives_the_frame_of_mlflow_search(lr_store: dict) -> None:
    from etbench.analysis import load

    uri = lr_store["tracking_uri"]
    client = load.client_for(uri)
    exp_id = load.experiment_id(client, lr_store["experiment"])
    client.set_terminated(client.search_runs([exp_id], max_results=1)[0].info.run_id, "FAILED")
    via_api = load.runs_frame(load.search_all(client, exp_id), include_failed=False)
    via_sql = load.frame_from_wide(load.sql_frame(uri, exp_id), include_failed=False)
    assert load.is_sql_store(uri) and not load.is_sql_store("http://127.0.0.1:5000")
    assert sorted(via_api[0].columns) == sorted(via_sql[0].columns) and len(via_api[0]) == 23
    pd.testing.assert_frame_equal(via_api[0], via_sql[0][via_api[0].columns])
    pd.testing.assert_frame_equal(via_api[1], via_sql[1])
    assert via_api[2] == via_sql[2] == [STEPS, "axis.train.lr"]
    client.set_terminated(via_api[1]["run_id"].iloc[0], "FINISHED")


def test_dedup_lookup_reads_hash_and_status_like_search_runs(lr_store: dict) -> None:
    from mlflow.tracking import MlflowClient

    from etbench.sweep.runner import _runs_by_hash
    from etbench.tracking import lookup
    from etbench.tracking.mlflow_log import find_finished

    uri, experiment = lr_store["tracking_uri"], lr_store["experiment"]
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    everything = client.search_runs([exp_id], max_results=1000)
    one = everything[5]
    client.set_terminated(one.info.run_id, "KILLED")
    try:
        fast = lookup.run_refs(uri, experiment)
        slow = lookup._api_refs(uri, exp_id, None, None)
        assert fast == slow and len(fast) == 24
        want = {r.info.run_id: (r.data.tags["etbench.config_hash"], r.info.status) for r in everything}
        want[one.info.run_id] = (want[one.info.run_id][0], "KILLED")
        assert {r.run_id: (r.config_hash, r.status) for r in fast} == want
        by_hash = _runs_by_hash(uri, experiment)
        h = one.data.tags["etbench.config_hash"]
        assert [r.info.status for r in by_hash[h]] == ["KILLED"] and len(by_hash) == 24
        assert find_finished(uri, experiment, h) == []
        other = everything[0].data.tags["etbench.config_hash"]
        assert find_finished(uri, experiment, other) == [everything[0].info.run_id]
        assert lookup._api_refs(uri, exp_id, other, "FINISHED") == lookup.run_refs(uri, experiment, config_hash=other,
                                                                                   status="FINISHED")
        assert lookup.runs_by_hash(uri, "no-such-experiment") == {}
    finally:
        client.set_terminated(one.info.run_id, "FINISHED")


def _describe(uri: str, experiment: str, model: str) -> dict:
    """What MLflow returns for one run of ``model``: tag/param/metric keys, history steps, artifacts, files."""
    import json

    from mlflow.tracking import MlflowClient

    from etbench.analysis.cache import local_artifact_dir

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags["etbench.model"] == model)
    steps = {k: sorted(p.step for p in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    folder = local_artifact_dir(run.info.artifact_uri)
    files = {p.name: p for p in folder.iterdir()}
    heads = {n: files[n].read_text().splitlines()[0] for n in ("metrics.csv", "energy_trace.csv") if n in files}
    return {"tags": set(run.data.tags), "params": set(run.data.params), "steps": steps,
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)), "heads": heads,
            "summary": set(json.loads(files["summary.json"].read_text())),
            "config": set(json.loads(files["config.json"].read_text())), "status": run.info.status,
            "artifact_uri": run.info.artifact_uri.removesuffix(f"/{run.info.run_id}/artifacts"),
            "location": exp.artifact_location, "experiment_tags": set(exp.tags)}


def _shape_of(steps: dict[str, list[int]], epochs: int, t: int) -> dict[str, list[int]]:
    """History steps normalised: per-epoch keys 1..epochs → "epochs", descent keys 0..T → "T" (dx_norm: T − 1)."""
    named = {tuple(range(1, epochs + 1)): "epochs", tuple(range(t + 1)): "T", tuple(range(t)): "T-1"}
    return {k: named.get(tuple(v), v) for k, v in steps.items()}


def test_generated_runs_match_a_real_tracked_run(tmp_path: Path) -> None:
    from etbench.config import resolve_run_config
    from etbench.engine.tracked import TrackingSpec, run_tracked

    shape = StoreShape((3,), (16,), (0.002,), (0,), epochs=3, trace_samples=4)
    gen = generate_store(tmp_path / "generated", shape, name="faithful", progress=lambda s: None)
    real_uri = f"sqlite:///{tmp_path / 'real.db'}"
    for model in ("et", "vit"):
        axes = {"model.et.steps": 2, "train.lr": 0.002, **({"model.et.memories": 16} if model == "et" else {})}
        cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
                                  "model": {"name": model, "et": {"steps": 2, "memories": 16}},
                                  "train": {"epochs": 2, "batch_size": 32, "lr": 0.002, "eval_trace_samples": 4}})
        spec = TrackingSpec(uri=real_uri, experiment="faithful", grid="faithful", run_name=f"{model} real", axes=axes,
                            artifact_root=str(tmp_path / "real-artifacts"))
        run_tracked(cfg, tmp_path / f"run-{model}", spec, progress=False)
    for model in ("et", "vit"):
        real, fake = _describe(real_uri, "faithful", model), _describe(gen["tracking_uri"], "faithful", model)
        for key in ("tags", "params", "artifacts", "heads", "summary", "config", "status", "experiment_tags"):
            assert real[key] == fake[key], (model, key, real[key] ^ fake[key] if isinstance(real[key], set) else "")
        assert _shape_of(real["steps"], 2, 2) == _shape_of(fake["steps"], 3, 3), model
        assert real["artifact_uri"] == real["location"] and fake["artifact_uri"] == fake["location"]


def _long_results_table() -> object:
    """A results table of 250 rows (et over steps × memories × lr, 3 seeds): what a large grid produces."""
    from etbench.analysis import tables

    rng = np.random.default_rng(0)
    rows = []
    for steps in (1, 2, 4, 8, 12):
        for mem in (16, 32, 64, 128, 256):
            for lr in (3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 1e-1):
                for seed in range(3):
                    mse = 0.1 / steps + 0.01 * rng.standard_normal()
                    rows.append({"model": "et", STEPS: steps, MEM: mem, "axis.train.lr": lr, "seed": seed,
                                 "metrics." + MSE: mse, "metrics.best/test/psnr": 10 * np.log10(1 / abs(mse)),
                                 "metrics.cost/params": 1e4 * mem, "metrics.cost/flops_per_sample": 1e6 * mem * steps})
    frame = pd.DataFrame(rows).assign(dataset="mnist", protocol="masked-completion", task="image", split=-1,
                                      paper_comparable=False)
    frame[["split", "seed", STEPS, MEM]] = frame[["split", "seed", STEPS, MEM]].astype("Int64")
    (table,) = tables.results_tables(frame, [MSE, "best/test/psnr"], [MEM, STEPS, "axis.train.lr"])
    assert len(table.display) == 250
    return table


def test_250_row_table_is_a_longtable_that_fits_its_pages(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from etbench.analysis import tables

    table = _long_results_table()
    tex = tables.write_table(table, tmp_path)[1].read_text()
    body = [ln for ln in tex.splitlines() if ln.rstrip().endswith(r"\\") and "&" in ln]
    assert tex.count(r"\begin{longtable}") == 1 and r"\begin{table}" not in tex
    assert r"\endhead" in tex and r"\endfirsthead" in tex and r"\toprule" in tex  # header repeated on every page
    assert len(body) == 2 * 1 + 250  # the header twice (first page, continued pages) and every row once
    short = tables.Table("short", "t", "c", table.display.head(5), table.latex.head(5), table.bold.head(5),
                         table.data.head(5))
    assert r"\begin{table}" in tables.to_latex(short) and "longtable" not in tables.to_latex(short)
    engine = shutil.which("pdflatex")
    if engine is None:
        print("pdflatex not installed (Debian: texlive-latex-base, texlive-latex-recommended): the compile step is "
              "skipped, the longtable structure was checked")
        return
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[textwidth=5.5in,textheight=9in]{geometry}\n"
                   + "".join(f"\\usepackage{{{p}}}\n" for p in tables.LATEX_PACKAGES)
                   + "\\begin{document}\n\\input{" + table.name + ".tex}\n\\end{document}\n")
    run = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-2000:]
    overfull = [ln for ln in log.splitlines() if ln.startswith("Overfull \\hbox")]
    assert overfull == [], overfull[:3]  # every row fits the 5.5 in text width
    pages = int(re.search(r"Output written on doc\.pdf \((\d+) pages?", log).group(1))
    assert pages >= 4, pages  # 250 rows break across pages instead of one float no page holds


def _big_frame() -> pd.DataFrame:
    """et over steps {1, 2, 4, 8} × memories (10 values) × lr (6 values) + vit over steps × lr, 3 seeds."""
    rows = []
    lrs = (3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
    for model, mems in (("et", tuple(16 * (i + 1) for i in range(10))), ("vit", (None,))):
        for mem in mems:
            for steps in (1, 2, 4, 8):
                for lr in lrs:
                    for seed in range(3):
                        mse = 0.1 / steps + (mem or 300) * 1e-4 + abs(np.log10(lr / 1e-3)) * 0.01 + 0.001 * seed
                        rows.append({"model": model, STEPS: steps, MEM: mem, "axis.train.lr": lr, "seed": seed,
                                     "metrics." + MSE: mse})
    frame = pd.DataFrame(rows).assign(dataset="d", protocol="p", task="image", split=-1, paper_comparable=False)
    frame[["split", "seed", STEPS, MEM]] = frame[["split", "seed", STEPS, MEM]].astype("Int64")
    return frame


def test_many_cells_become_readable_pages_that_keep_every_cell() -> None:
    import matplotlib.pyplot as plt

    from etbench.analysis import facets, style
    from etbench.analysis.stats import CIConfig

    frame, axes = _big_frame(), [MEM, STEPS, "axis.train.lr"]
    made = figures.steps_figures(frame, MSE, axes, CIConfig(method="t"))
    names = [n for n, _ in made.made]
    assert len(names) == len(set(names)) and all(n.startswith("steps_d_p_mse_masked_memories-") for n in names)
    seen: set[tuple[object, ...]] = set()
    for name, fig in made.made:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert 1 <= len(panels) <= facets.PANELS_PER_PAGE
        for ax in panels:
            lines = ax.get_lines()
            assert len(lines) <= facets.LINES_PER_PANEL, (name, len(lines))
            lr = ax.get_title().split("=", 1)[1]
            for line in lines:
                assert list(line.get_xdata()) == [1.0, 2.0, 4.0, 8.0], (name, line.get_label())  # no zigzag
                seen.add((lr, line.get_label()))
        assert style.label_problems(fig) == [], name
        plt.close(fig)
    want = {(repr(lr), f"et memories={m}") for lr in (3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2) for m in range(16, 161, 16)}
    want |= {(repr(lr), "vit") for lr in (3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)}
    assert seen == want  # every (lr, memories) cell drawn somewhere
    heat = figures.memory_heatmaps(frame, MSE, axes, CIConfig(method="t"))
    assert len(heat.made) == 6  # one per lr for et (vit has no memory axis)
    for name, fig in heat.made:
        assert style.label_problems(fig) == [], name
        plt.close(fig)
    assert plt.get_fignums() == []


def test_dense_pareto_keeps_its_front_visible() -> None:
    """264 cells: small see-through points without caps, the front drawn above them (it was under the points)."""
    import matplotlib.pyplot as plt

    from etbench.analysis import style
    from etbench.analysis.stats import CIConfig

    frame = _big_frame()
    cost = 400 - frame[MEM].fillna(300).astype(float)  # dearer = fewer memories = lower MSE: a real trade-off
    frame = frame.assign(**{"metrics.cost/params": 1e3 * cost,
                            "metrics.cost/flops_per_sample": 1e5 * cost * frame[STEPS].astype(float)})
    (name, fig), = figures.pareto_figures(frame, MSE, [MEM, STEPS, "axis.train.lr"], CIConfig(method="t")).made
    for ax in fig.axes[:2]:
        points = [c.lines[0] for c in ax.containers]
        (front,) = [line for line in ax.get_lines() if line not in points]
        assert len(front.get_xdata()) >= 2 and front.get_zorder() > max(p.get_zorder() for p in points)
        assert all(p.get_markersize() <= 2.0 and p.get_alpha() == 0.5 for p in points)
        assert all(not c.lines[1] for c in ax.containers)  # no caps
    assert style.label_problems(fig) == [], name
    plt.close(fig)


def _terms_frame() -> pd.DataFrame:
    """et over energy terms (3) × memories (10 values) × steps {1, 4} × lr (7 values), 2 seeds, and a vit
    (no terms axis, so not in the terms figures) over steps × lr."""
    rows = []
    for model, terms, mems in (("et", ("attn+hn", "attn", "hn"), tuple(16 * (i + 1) for i in range(10))),
                               ("vit", (None,), (None,))):
        for term in terms:
            for mem in mems:
                for steps in (1, 4):
                    for lr in (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 3e-2):
                        for seed in range(2):
                            mse = 0.1 / steps + (mem or 300) * 1e-4 + 0.01 * (terms.index(term) if term else 5) \
                                + lr + 0.001 * seed
                            rows.append({"model": model, "axis.model.terms": term, MEM: mem, STEPS: steps,
                                         "axis.train.lr": lr, "seed": seed, "metrics." + MSE: mse})
    frame = pd.DataFrame(rows).assign(dataset="d", protocol="p", task="image", split=-1, paper_comparable=False)
    frame[["split", "seed", STEPS, MEM]] = frame[["split", "seed", STEPS, MEM]].astype("Int64")
    return frame


def test_terms_figures_page_many_cells_and_keep_every_cell() -> None:
    """140 (memories × steps × lr) slices: pages of small multiples with at most LINES_PER_PANEL series per panel
    and PANELS_PER_PAGE panels per page, every cell's mean drawn exactly once at its energy-term variant."""
    import matplotlib.pyplot as plt

    from etbench.analysis import facets, style
    from etbench.analysis.stats import CIConfig, summarize

    frame, axes = _terms_frame(), ["axis.model.terms", MEM, STEPS, "axis.train.lr"]
    made = figures.terms_figures(frame, MSE, axes, CIConfig(method="t"))
    names = [n for n, _ in made.made]
    assert names == ["terms_d_p_mse_masked_memories-16to80_page-1of2", "terms_d_p_mse_masked_memories-16to80_page-2of2",
                     "terms_d_p_mse_masked_memories-96to160_page-1of2",
                     "terms_d_p_mse_masked_memories-96to160_page-2of2"]
    order = ["attn+hn", "attn", "hn"]
    drawn: dict[tuple[object, ...], float] = {}
    for name, fig in made.made:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert 1 <= len(panels) <= facets.PANELS_PER_PAGE
        for ax in panels:
            assert [t.get_text() for t in ax.get_xticklabels()] == order
            assert len(ax.containers) <= facets.LINES_PER_PANEL, (name, len(ax.containers))
            fixed = dict(part.split("=") for part in ax.get_title().split(", "))
            for bars in ax.containers:
                mem = int(bars.get_label().rsplit("=", 1)[1])
                for x, y in zip(*bars.lines[0].get_data(), strict=True):
                    key = (order[round(x)], mem, int(fixed["steps"]), float(fixed["lr"]))
                    assert key not in drawn, key
                    drawn[key] = y
        assert style.label_problems(fig) == [], name
        plt.close(fig)
    table = summarize(frame[frame["model"] == "et"], MSE, axes, cfg=CIConfig(method="t"), complete=False)
    want = {(r["axis.model.terms"], r[MEM], r[STEPS], r["axis.train.lr"]): r["mean"] for _, r in table.iterrows()}
    assert drawn.keys() == want.keys() and len(want) == 3 * 10 * 2 * 7
    assert all(drawn[k] == pytest.approx(want[k]) for k in want)
    few = figures.terms_figures(frame[frame[MEM].isin([16, 32]) & (frame["axis.train.lr"] == 1e-3)
                                      & (frame[STEPS] == 4)], MSE, axes, CIConfig(method="t"))
    assert [n for n, _ in few.made] == ["terms_d_p_mse_masked_memories-16", "terms_d_p_mse_masked_memories-32"]
    for _, fig in few.made:
        plt.close(fig)
    assert plt.get_fignums() == []


def test_descent_bands_equal_mean_ci_and_energy_pages_cap_lines() -> None:
    import matplotlib.pyplot as plt

    from etbench.analysis import descent, facets, style
    from etbench.analysis.stats import CIConfig, mean_ci

    rng = np.random.default_rng(1)
    rows = []
    for mem in (16, 32, 48, 64, 80, 96, 112, 128, 144, 160):
        for steps in (1, 3):
            for seed in range(2):
                for sample in range(3):
                    for t in range(steps + 1):
                        e = -800 - 10 * t - mem / 10 + rng.standard_normal()
                        rows.append({"run_id": f"{mem}-{steps}-{seed}", "step": t, "sample": sample, "E": e,
                                     "E_att": e * 0.9, "E_hn": e * 0.1, "dx_norm": 0.5, "source": "trace",
                                     MEM: mem, STEPS: steps, "seed": seed})
    energy = pd.DataFrame(rows).assign(dataset="d", protocol="p", model="et", split=-1)
    curves = descent.descent_curves(energy, [MEM, STEPS])
    for (mem, steps, t), g in energy.groupby([MEM, STEPS, "step"]):
        want = mean_ci(g["E_att"].to_numpy(float), CIConfig(method="t"))
        got = curves[(curves[MEM] == mem) & (curves[STEPS] == steps) & (curves["step"] == t)
                     & (curves["term"] == "E_att")].iloc[0]
        for key in ("mean", "std", "ci_low", "ci_high"):
            assert got[key] == pytest.approx(want[key]), key
        assert got["n"] == want["n"] == 6
    made = descent.energy_figures(energy, [MEM, STEPS])
    assert [n for n, _ in made.made] == ["energy_d_p_et_memories-16to80", "energy_d_p_et_memories-96to160"]
    assert made.tables[0][0] == "energy_descent_d_p_et" and len(made.tables[0][1]) == len(curves[curves["n"] > 0])
    for name, fig in made.made:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == ["steps=1", "steps=3"]
        assert all(len(ax.get_lines()) == 5 <= facets.LINES_PER_PANEL for ax in panels)
        assert style.label_problems(fig) == [], name
        plt.close(fig)


def test_cached_summary_equals_summarize_and_sees_changed_values() -> None:
    from etbench.analysis.stats import CIConfig, summarize
    from etbench.analysis.summary_cache import cached_summarize

    frame, cfg = _zigzag_frame(), CIConfig(method="t")
    first = cached_summarize(frame, MSE, [MEM, STEPS], cfg=cfg)
    pd.testing.assert_frame_equal(first, summarize(frame, MSE, [MEM, STEPS], cfg=cfg))
    first.loc[0, "mean"] = -1.0  # a caller's change does not reach the cache
    assert cached_summarize(frame, MSE, [MEM, STEPS], cfg=cfg).loc[0, "mean"] != -1.0
    changed = frame.assign(**{"metrics." + MSE: frame["metrics." + MSE] + 1.0})
    again = cached_summarize(changed, MSE, [MEM, STEPS], cfg=cfg)
    pd.testing.assert_frame_equal(again, summarize(changed, MSE, [MEM, STEPS], cfg=cfg))


def test_unchanged_report_is_kept_and_a_changed_run_redraws(lr_store: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from etbench.analysis import report as report_mod

    uri, experiment, out = lr_store["tracking_uri"], lr_store["experiment"], tmp_path / "report"
    first = make_report(experiment, uri, out, progress=lambda s: None)
    stamps = {p: p.stat().st_mtime_ns for p in first.figures}
    drawn: list[str] = []
    original = report_mod._sink

    def counting(folder: Path, result: object) -> object:
        put = original(folder, result)
        return lambda name, fig: drawn.append(name) or put(name, fig)

    monkeypatch.setattr(report_mod, "_sink", counting)
    again = make_report(experiment, uri, out, progress=lambda s: None)
    assert drawn == [] and sorted(again.figures) == sorted(first.figures) and again.titles == first.titles
    assert {p: p.stat().st_mtime_ns for p in again.figures} == stamps
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1)[0]
    client.log_metric(run.info.run_id, MSE, 0.5)  # a changed value: everything is recomputed
    changed = make_report(experiment, uri, out, progress=lambda s: None)
    assert drawn and sorted(changed.figures) == sorted(first.figures)
    listed = sorted(re.findall(r"figures/(\S+?\.(?:pdf|png))", changed.index.read_text()))
    assert listed == sorted(p.name for p in (out / "figures").iterdir())
