"""etbench.analysis against a small real MLflow store with known values (et/vit × steps {1, 4} × 3 seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from etbench.analysis import descent, figures, style, tables
from etbench.analysis.cache import RunCache, energy_frame
from etbench.analysis.load import load_runs
from etbench.analysis.metrics import choose_metrics
from etbench.analysis.references import load_references
from etbench.analysis.report import make_report
from etbench.analysis.stats import CIConfig, compare, mean_ci, summarize
from etbench.tracking import schema

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "grid-test"
MSE = "best/test/mse_masked"
STEPS = "axis.model.steps"
# (model, steps) → mse per seed 0, 1, 2; the cell (vit, 4) is missing on purpose.
VALUES = {("et", 1): [0.10, 0.12, 0.11], ("et", 4): [0.08, 0.09, 0.07], ("vit", 1): [0.15, 0.14, 0.18]}
FAILED_VALUE = 0.5  # et, steps 4, seed 3, status FAILED
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def _trace(seed: int, steps: int) -> pd.DataFrame:
    """A small energy trace: 2 samples, steps 0..T, E decreasing with a seed-dependent offset."""
    rows = []
    for sample in range(2):
        for t in range(steps + 1):
            e_att, e_hn = -1.0 - t - 0.1 * seed, -2.0 - 0.5 * t - 0.1 * sample
            rows.append({"step": t, "sample": sample, "E": e_att + e_hn, "E_att": e_att, "E_hn": e_hn,
                         "dx_norm": 1.0 / (t + 1), "rose": 0})
    return pd.DataFrame(rows)


def _log_run(client: MlflowClient, exp_id: str, tmp: Path, model: str, steps: int, seed: int, mse: float,
             status: str = "FINISHED") -> str:
    tags = {schema.TAG_TASK: "image", schema.TAG_MODEL: model, schema.TAG_DATASET: "digits",
            schema.TAG_PROTOCOL: "masked-completion", schema.TAG_SEED: str(seed), schema.TAG_SPLIT: "-1",
            schema.TAG_AXIS_PREFIX + "model.steps": str(steps), schema.TAG_PAPER_COMPARABLE: "false",
            schema.TAG_GRID: EXPERIMENT, schema.TAG_CONFIG_HASH: f"{model}{steps}{seed}"}
    if status == "FAILED":
        tags[schema.TAG_ERROR] = "diverged"
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    now = 1_700_000_000_000
    metrics = [Metric(schema.best_metric("test", "mse_masked"), mse, now, 0),
               Metric(schema.best_metric("test", "psnr"), -10 * np.log10(mse), now, 0),
               Metric("cost/params", 1e5 * (2 if model == "vit" else 1) * steps, now, 0),
               Metric("cost/flops_per_sample", 1e7 * steps * (3 if model == "vit" else 1), now, 0),
               Metric("cost/throughput", 1000.0 + seed, now, 0), Metric("cost/peak_mem_mb", 50.0, now, 0)]
    folder = tmp / run_id
    folder.mkdir()
    if model == "et":
        trace = _trace(seed, steps)
        if steps == 1:  # per-sample trace artifact
            trace.to_csv(folder / schema.ENERGY_TRACE_ARTIFACT, index=False)
        mean = trace.groupby("step")[["E", "E_att", "E_hn", "dx_norm"]].mean()
        for term in ("E", "E_att", "E_hn", "dx_norm"):  # energy/* histories, step = descent step
            metrics += [Metric(f"energy/{term}", float(v), now, int(t)) for t, v in mean[term].items()]
        (folder / "memories.png").write_bytes(PNG)
    (folder / "reconstruction.png").write_bytes(PNG)
    client.log_batch(run_id, metrics=metrics, params=[Param("model.steps", str(steps)), Param("train.seed", str(seed))])
    for f in folder.iterdir():
        client.log_artifact(run_id, str(f))
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=tmp.as_uri() + "/artifacts")
    ids = {}
    staging = tmp / "staging"
    staging.mkdir()
    for (model, steps), values in VALUES.items():
        for seed, v in enumerate(values):
            ids[(model, steps, seed)] = _log_run(client, exp_id, staging, model, steps, seed, v)
    ids[("et", 4, 3)] = _log_run(client, exp_id, staging, "et", 4, 3, FAILED_VALUE, status="FAILED")
    return {"uri": uri, "client": client, "ids": ids, "tmp": tmp}


def _cell(table: pd.DataFrame, model: str, steps: int) -> pd.Series:
    rows = table[(table["model"] == model) & (table[STEPS] == steps)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_load_keeps_finished_and_reports_failed(store: dict) -> None:
    table = load_runs(EXPERIMENT, store["uri"])
    assert len(table.runs) == 9 and set(table.runs["status"]) == {"FINISHED"}
    assert table.axes == [STEPS] and table.runs[STEPS].dtype == "Int64"
    assert list(table.excluded["status"]) == ["FAILED"] and "diverged" in table.excluded["reason"].iloc[0]
    assert (table.runs["paper_comparable"] == False).all()  # noqa: E712
    with_failed = load_runs(EXPERIMENT, store["uri"], include_failed=True)
    assert len(with_failed.runs) == 10 and with_failed.excluded.empty
    with pytest.raises(ValueError, match="no-such-grid"):
        load_runs("no-such-grid", store["uri"])


def test_summary_against_direct_computation(store: dict) -> None:
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    cfg = CIConfig(n_resamples=2000, seed=7)
    table = summarize(runs, MSE, [STEPS], cfg=cfg)
    for (model, steps), values in VALUES.items():
        row, x = _cell(table, model, steps), np.array(values)
        assert row["n"] == 3 and row["mean"] == pytest.approx(x.mean()) and row["std"] == pytest.approx(x.std(ddof=1))
        ref = stats.t.interval(0.95, 2, loc=x.mean(), scale=stats.sem(x))  # n = 3 < 10: Student t by default
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(ref) and row["interval"] == "t"
    missing = _cell(table, "vit", 4)
    assert missing["n"] == 0 and np.isnan(missing["mean"]) and np.isnan(missing["ci_low"])
    failed = summarize(load_runs(EXPERIMENT, store["uri"], include_failed=True).runs, MSE, [STEPS], cfg=cfg)
    assert _cell(failed, "et", 4)["n"] == 4
    assert _cell(failed, "et", 4)["mean"] == pytest.approx(np.mean([*VALUES[("et", 4)], FAILED_VALUE]))
    one = mean_ci([0.3])
    assert one["n"] == 1 and one["mean"] == 0.3 and np.isnan(one["ci_low"]) and np.isnan(one["std"])


def test_paired_comparison_against_scipy(store: dict) -> None:
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    cmp = compare(runs, MSE, [STEPS], cfg=CIConfig(n_resamples=2000, seed=3))
    assert list(cmp[STEPS]) == [1]  # vit has no steps=4 runs: no pair, no invented comparison
    row = cmp.iloc[0]
    et, vit = np.array(VALUES[("et", 1)]), np.array(VALUES[("vit", 1)])
    assert row["n"] == 3 and row["mean_diff"] == pytest.approx((et - vit).mean())
    assert row["p_ttest"] == pytest.approx(stats.ttest_rel(et, vit).pvalue)
    assert np.isnan(row["p_wilcoxon"]) and row["p_holm"] == pytest.approx(row["p_ttest"])  # a family of one
    assert row["favours"] == ("et" if row["p_ttest"] < 0.05 else "no difference shown")  # lower MSE is better
    d = et - vit
    assert row["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
    ci = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(ci)


def _graph_frame() -> pd.DataFrame:
    """Synthetic graph runs: et/gcn × 2 splits × 6 seeds, AUROC with a split effect."""
    rng = np.random.default_rng(0)
    rows = []
    for model, split, seed in [(m, s, d) for m in ("et", "gcn") for s in (0, 1) for d in range(6)]:
        auroc = 0.8 + 0.05 * split + (0.03 if model == "et" else 0.0) + 0.01 * rng.standard_normal()
        rows.append({"dataset": "tolokers", "protocol": "gadbench", "model": model, "split": split, "seed": seed,
                     "task": "graph", "paper_comparable": True, "metrics.best/test/auroc": auroc})
    frame = pd.DataFrame(rows)
    frame[["split", "seed"]] = frame[["split", "seed"]].astype("Int64")
    return frame


def test_splits_not_pooled_and_wilcoxon() -> None:
    runs, metric = _graph_frame(), "best/test/auroc"
    col = "metrics." + metric
    per_split = summarize(runs, metric, over="seed")
    assert len(per_split) == 4 and set(per_split["n"]) == {6}
    over = summarize(runs, metric, over="split")
    et = runs[runs["model"] == "et"]
    split_means = et.groupby("split")[col].mean()
    row = over[over["model"] == "et"].iloc[0]
    assert row["n"] == 2 and row["mean"] == pytest.approx(split_means.mean())
    cmp = compare(runs, metric, over="seed")
    assert len(cmp) == 2
    for _, r in cmp.iterrows():
        a = runs[(runs["model"] == "et") & (runs["split"] == r["split"])].sort_values("seed")[col].to_numpy()
        b = runs[(runs["model"] == "gcn") & (runs["split"] == r["split"])].sort_values("seed")[col].to_numpy()
        assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert len(compare(runs, metric, over="split")) == 1
    (per,) = tables.results_tables(runs, [metric], over="seed")
    (pooled,) = tables.results_tables(runs, [metric], over="split")
    assert list(per.display.columns[:2]) == ["model", "split"] and "split" not in pooled.display.columns
    assert "over seeds, per split" in per.caption and "over splits" in pooled.caption


def test_et_only_axis_neither_multiplies_nor_blocks_baselines() -> None:
    """A baseline without ET's ``model.terms`` axis gets no invented terms cells and is compared with each."""
    rows = []
    for seed, steps, terms in [(d, s, t) for d in range(3) for s in (1, 4) for t in ("attn+hn", "attn")]:
        mse = 0.1 * steps + 0.01 * seed + 0.05 * (terms == "attn")
        rows.append({"model": "et", STEPS: steps, "axis.model.terms": terms, "seed": seed, "metrics." + MSE: mse})
    for seed in range(3):
        rows.append({"model": "vit", STEPS: 1, "axis.model.terms": None, "seed": seed,
                     "metrics." + MSE: 0.2 + 0.02 * seed})
    runs = pd.DataFrame(rows).assign(dataset="d", protocol="p", task="image", split=-1, paper_comparable=True)
    runs[["split", "seed", STEPS]] = runs[["split", "seed", STEPS]].astype("Int64")
    axes = [STEPS, "axis.model.terms"]
    table = summarize(runs, MSE, axes)
    vit = table[table["model"] == "vit"]
    assert len(table) == 6 and vit["axis.model.terms"].isna().all() and list(vit["n"]) == [3, 0]
    cmp = compare(runs, MSE, axes).set_index("axis.model.terms")
    assert list(cmp[STEPS]) == [1, 1] and set(cmp["n"]) == {3}
    assert cmp.loc["attn", "mean_diff"] == pytest.approx(0.16 - 0.22)
    assert cmp.loc["attn+hn", "mean_diff"] == pytest.approx(0.11 - 0.22)
    assert tables.fmt_mean_ci(0.11, 0.0099999, 3) == "0.110 ± 0.010"
    assert tables.fmt_mean_ci(0.3, np.nan, 1) == "0.3 (n=1)" and tables.fmt_mean_ci(np.nan, np.nan, 0) == "missing"


def test_tables_markdown_latex_csv(store: dict, tmp_path: Path) -> None:
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    metrics = choose_metrics(runs)
    assert metrics == [MSE, "best/test/psnr"]
    with pytest.raises(ValueError, match="not logged"):
        choose_metrics(runs, ["best/test/auroc"])
    (table,) = tables.results_tables(runs, metrics, [STEPS])
    paths = tables.write_table(table, tmp_path)
    md, tex = paths[0].read_text(), paths[1].read_text()
    assert "not paper-comparable" in md and "not paper-comparable" in tex
    assert "digits" in md and "masked-completion" in md
    best = np.mean(VALUES[("et", 4)])
    assert f"**{best:.3f} ±" in md  # lowest MSE bold
    lines = [ln for ln in md.splitlines() if ln.startswith("| vit |") and "| 4 |" in ln]
    assert len(lines) == 1 and "missing" in lines[0] and "| 0 |" in lines[0]
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf{" in tex and r"$\pm$" in tex
    assert "inference GFLOPs/sample (fwd)" in md and "params (M)" in md and "train throughput (samples/s)" in md
    assert "train-step peak mem (MiB)" in md
    csv = pd.read_csv(paths[2])
    et4 = csv[(csv["model"] == "et") & (csv[STEPS] == 4)].iloc[0]
    assert et4[f"{MSE}:mean"] == pytest.approx(best) and et4[f"{MSE}:n"] == 3
    assert et4["cost/flops_per_sample"] == pytest.approx(4e7)
    assert csv[(csv["model"] == "vit") & (csv[STEPS] == 4)].iloc[0][f"{MSE}:n"] == 0


def test_references_yaml(store: dict, tmp_path: Path) -> None:
    shipped = load_references(REPO / "analysis" / "reference_results.yaml")
    assert list(shipped.columns)[:6] == ["source", "dataset", "protocol", "model", "metric", "value"]
    path = tmp_path / "refs.yaml"
    path.write_text("references:\n  - {source: 'test table', dataset: digits, protocol: masked-completion,\n"
                    "     model: 'ET (paper)', metric: best/test/mse_masked, value: 0.042,\n"
                    "     match: {params.model.steps: '9'}}\n")
    refs = load_references(path)
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    (table,) = tables.results_tables(runs, [MSE], [STEPS], references=refs)
    assert "[ref]" not in tables.to_markdown(table)  # match on model.steps fails
    refs.at[0, "match"] = {}
    (table,) = tables.results_tables(runs, [MSE], [STEPS], references=refs)
    md = tables.to_markdown(table)
    assert "ET (paper) [ref]" in md and "0.042" in md and "test table" in md
    path.write_text("references:\n  - {source: x, dataset: digits}\n")
    with pytest.raises(ValueError, match="protocol"):
        load_references(path)


def test_report_and_cache(store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, cache_dir, lines = tmp_path / "report", tmp_path / "cache", []
    result = make_report(EXPERIMENT, store["uri"], out, cache_dir=cache_dir, progress=lines.append)
    assert lines and result.n_runs == 9 and result.index.exists()
    names = {p.name for p in result.figures}
    for stem in ("steps_digits_masked-completion_mse_masked", "pareto_digits_masked-completion_mse_masked",
                 "energy_digits_masked-completion_et"):
        assert {stem + ".pdf", stem + ".png"} <= names
    assert all(p.stat().st_size > 0 for p in result.figures + result.tables + result.images)
    assert len(result.images) == 3  # reconstruction of et and vit, memories of et
    assert result.warnings == []  # no overlapping or cut-off labels
    assert any("terms" in s for s in result.skipped) and any("memory heatmap" in s for s in result.skipped)
    readme = result.index.read_text()
    assert "status FAILED: diverged" in readme and "steps_digits" in readme

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("MLflow artifact/history fetched although cached")

    for name in ("download_artifacts", "list_artifacts", "get_metric_history"):
        monkeypatch.setattr(MlflowClient, name, forbidden)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", forbidden)
    again = make_report(EXPERIMENT, store["uri"], tmp_path / "report2", cache_dir=cache_dir, progress=lambda s: None)
    assert sorted(p.name for p in again.figures) == sorted(names)
    monkeypatch.undo()

    # Artifacts outside a local folder are downloaded once per run version (here: the run frame without
    # artifact_uri, so the cache asks MLflow for it and goes through the artifact repository).
    changed = store["ids"][("et", 1, 0)]
    traced = load_runs(EXPERIMENT, store["uri"]).runs
    traced = traced[(traced["model"] == "et") & (traced[STEPS] == 1)].drop(columns="artifact_uri")
    remote = RunCache(MlflowClient(tracking_uri=store["uri"]), tmp_path / "remote")
    first = [remote.artifact(row, schema.ENERGY_TRACE_ARTIFACT) for _, row in traced.iterrows()]
    assert remote.downloads == 3 and all(p is not None and p.is_relative_to(tmp_path / "remote") for p in first)
    [remote.artifact(row, schema.ENERGY_TRACE_ARTIFACT) for _, row in traced.iterrows()]
    assert remote.downloads == 3

    # A run that changed in MLflow (new end_time) is read again; the others come from the caches.
    store["client"].set_terminated(changed, "FINISHED", end_time=1_800_000_000_000)
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    cache = RunCache(MlflowClient(tracking_uri=store["uri"]), cache_dir)
    energy_frame(runs[runs["model"] == "et"], cache, keep=["seed", STEPS])
    assert cache.trace_reads == [changed]
    row = runs[runs["run_id"] == changed].drop(columns="artifact_uri").iloc[0]
    remote.artifact(row, schema.ENERGY_TRACE_ARTIFACT)
    assert remote.downloads == 4
    meta = json.loads((tmp_path / "remote" / "runs" / changed / "meta.json").read_text())
    assert meta["end_time"] == 1_800_000_000_000


def test_energy_frame_values(store: dict, tmp_path: Path) -> None:
    runs = load_runs(EXPERIMENT, store["uri"]).runs
    cache = RunCache(MlflowClient(tracking_uri=store["uri"]), tmp_path)
    energy = energy_frame(runs[runs["model"] == "et"], cache, keep=["seed", STEPS])
    trace = energy[energy[STEPS] == 1]
    assert set(trace["source"]) == {"trace"} and len(trace) == 3 * 2 * 2
    hist = energy[energy[STEPS] == 4]
    assert set(hist["source"]) == {"metrics"} and set(hist["sample"]) == {-1} and len(hist) == 3 * 5
    for seed in range(3):
        want = _trace(seed, 4).groupby("step")["E"].mean().to_numpy()
        got = hist[hist["seed"] == seed].sort_values("step")["E"].to_numpy()
        np.testing.assert_allclose(got, want)
    curves = descent.descent_curves(energy.assign(dataset="d"), [STEPS])
    c = curves[(curves[STEPS] == 1) & (curves["step"] == 1) & (curves["term"] == "E_att")].iloc[0]
    values = trace[trace["step"] == 1]["E_att"].to_numpy()
    assert c["n"] == 6 and c["mean"] == pytest.approx(values.mean())


def _ablation_frame() -> pd.DataFrame:
    """Synthetic ET ablation runs: terms × memories × steps × 3 seeds (one memory × steps cell missing)."""
    rows = []
    for terms in ("attn+hn", "attn", "hn"):
        for mem in (64, 256):
            for steps in (2, 4, 8):
                if (mem, steps) == (256, 8):
                    continue
                for seed in range(3):
                    rows.append({"dataset": "mnist", "protocol": "masked-completion", "model": "et", "task": "image",
                                 "split": -1, "seed": seed, "axis.model.terms": terms, "axis.model.memories": mem,
                                 STEPS: steps, "metrics." + MSE: 0.1 / steps + 0.01 * seed + (mem == 64) * 0.02,
                                 "metrics.cost/params": 1e4 * mem, "metrics.cost/flops_per_sample": 1e6 * mem * steps})
    frame = pd.DataFrame(rows)
    frame[["split", "seed", "axis.model.memories", STEPS]] = frame[["split", "seed", "axis.model.memories",
                                                                     STEPS]].astype("Int64")
    return frame


def test_ablation_figures_written_without_overlap(tmp_path: Path) -> None:
    runs, axes = _ablation_frame(), ["axis.model.memories", "axis.model.terms", STEPS]
    cfg = CIConfig(n_resamples=500)
    made = figures.FigureSet()
    for make in (figures.steps_figures, figures.terms_figures, figures.memory_heatmaps, figures.pareto_figures):
        made.extend(make(runs, MSE, axes, cfg))
    kinds = {name.split("_")[0] for name, _ in made.made}
    assert kinds == {"steps", "terms", "memory", "pareto"} and not made.skipped
    assert len([n for n, _ in made.made if n.startswith("memory")]) == 3  # one per terms value
    for name, fig in made.made:
        assert style.label_problems(fig) == [], name
        paths = style.save(fig, tmp_path / name)
        assert all(p.stat().st_size > 0 for p in paths)
    assert plt.get_fignums() == []
