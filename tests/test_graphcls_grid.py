"""Graph classification folds as grid trials (issue 26 items 4-5): a tiny tuned cv10 grid and the authors' protocol
through ``run_sweep`` (in-process loopback Ray, MLflow), the report aggregating folds (one row per dataset × model,
n = folds, sd beside the t interval, the authors' rows labelled training accuracy), and from the fold indices each
run recorded: the inner holdout never touches the outer test fold, and the folds are the oracle's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from etbench.analysis.report import folds_as_splits

FOLDS = [0, 1]
CV10 = {
    "name": "tiny_graphcls",
    "base": {"task": {"kind": "graphcls", "dataset": "mutag", "protocol": "cv10", "pe_dim": 4},
             "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0, "eval_trace_samples": 2,
                       "device": "cpu"},
             "model": {"et": {"dim": 16, "heads": 2, "head_dim": 8}, "hidden": 16, "layers": 2}},
    "models": ["et", "gin", "mlp"],
    "seeds": [0],
    "splits": FOLDS,
    "max_concurrent_trials": 2,
    "tracking": {"experiment": "tiny_graphcls"},
    "tuning": {"algorithm": "random", "search_seed": 0, "seed": 1000,
               "budget": {"configurations": 1, "epochs": 1}, "scheduler": {"kind": "none"},
               "models": {m: {"space": {"train.lr": [1e-3]}} for m in ("et", "gin", "mlp")}},
}
AUTHORS = {**{k: v for k, v in CV10.items() if k != "tuning"}, "name": "tiny_graphcls_authors", "models": ["et"],
           "base": {**CV10["base"], "task": {**CV10["base"]["task"], "protocol": "authors"}}}


def _runs(uri: str, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("etbench.kind") != "grid"]  # the grid's parent run holds no trial


@pytest.fixture(scope="module")
def graphcls_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[Any]]:
    from etbench.sweep.runner import run_sweep

    tmp = tmp_path_factory.mktemp("graphcls_grid")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    for spec in (CV10, AUTHORS):
        path = tmp / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec))
        res = run_sweep(path, results_dir=tmp / "results", tracking_uri=uri, progress=False)
        assert not res.failed, res.failed
    return uri, tmp, _runs(uri, "tiny_graphcls")


def _summary(uri: str, run: Any) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    local = MlflowClient(uri).download_artifacts(run.info.run_id, "summary.json")
    return json.loads(Path(local).read_text())


def test_recorded_folds_keep_the_inner_holdout_off_the_test_fold(graphcls_sweep: tuple[str, Path, list[Any]],
                                                                 shared_data: Path) -> None:
    from etbench.data.tudataset import load_tu_dataset
    from etbench.tasks.graphcls_folds import authors, cv10

    uri, _, runs = graphcls_sweep
    y = load_tu_dataset("mutag", shared_data / "tudataset" / "MUTAG.zip").y
    oracle = {"cv10": cv10(y, seed=0), "authors": authors(y, seed=0)}
    finals = [r for r in runs if r.data.tags.get("etbench.stage") in ("final", None)]
    assert len(finals) == 3 * len(FOLDS) + len(FOLDS)  # cv10: 3 models × folds; authors: the ET × folds
    for r in runs:  # every run, tuning runs too, recorded its fold's graphs
        data = _summary(uri, r)["data"]
        idx = {k: np.asarray(v, dtype=np.int64) for k, v in data["fold_indices"].items()}
        want = oracle[data["protocol"]][data["fold"]]
        assert all(np.array_equal(idx[k], getattr(want, k)) for k in ("train", "val", "test"))
        if data["protocol"] == "cv10":
            assert not np.intersect1d(idx["val"], idx["test"]).size  # selection never sees the outer test fold
            assert not np.intersect1d(idx["train"], idx["test"]).size and not np.intersect1d(idx["train"],
                                                                                             idx["val"]).size
            assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(y.size))
        else:  # authors: trained on every graph, scored on some of them
            assert data["training_accuracy"] and idx["val"].size == 0 and np.array_equal(idx["train"],
                                                                                         np.arange(y.size))
    tuned = [r for r in runs if r.data.tags.get("etbench.stage") == "tune"]
    assert len(tuned) == 3 and {int(r.data.params["task.fold"]) for r in tuned} == {FOLDS[0]}


def test_report_has_one_row_per_dataset_and_model_with_n_folds(graphcls_sweep: tuple[str, Path, list[Any]]) -> None:
    from etbench.analysis.report import make_report

    uri, tmp, runs = graphcls_sweep
    rep = make_report("tiny_graphcls", uri, tmp / "report", progress=lambda s: None)
    assert rep.n_runs == 3 * len(FOLDS) + len(FOLDS)  # final cv10 runs and the (untuned) authors runs
    tables = tmp / "report" / "tables"
    held = pd.read_csv(tables / "results_mutag_cv10_over-splits.csv")
    assert sorted(held["model"]) == ["et", "gin", "mlp"]  # one row per model: folds aggregated, not rows
    assert list(held["best/test/acc:n"]) == [len(FOLDS)] * 3
    for _, row in held.iterrows():  # the oracle: mean and sd over the folds' recorded test accuracies
        vals = [r.data.metrics["best/test/acc"] for r in runs if r.data.tags["etbench.model"] == row["model"]
                and r.data.tags.get("etbench.stage") == "final"]
        assert len(vals) == len(FOLDS)
        assert row["best/test/acc:mean"] == pytest.approx(np.mean(vals))
        assert row["best/test/acc:std"] == pytest.approx(np.std(vals, ddof=1))
    md = (tables / "results_mutag_cv10_over-splits.md").read_text()
    assert "n = folds" in md and "Student t" in md and "sd (test acc)" in md and "held-out" in md
    train = pd.read_csv(tables / "results_mutag_authors_over-splits.csv")
    assert list(train["model"]) == ["et"] and list(train["best/test/acc:n"]) == [len(FOLDS)]
    md = (tables / "results_mutag_authors_over-splits.md").read_text()
    assert md.count("TRAINING accuracy") >= 3  # title, caption and the row itself
    assert not list(tables.glob("*per-split*"))  # no per-fold tables: a fold is a replicate, not a cell
    compare = pd.read_csv(tables / "compare_mutag_cv10_over-splits.csv")
    assert sorted(compare["baseline"]) == ["gin", "mlp"] and set(compare["n"]) == {len(FOLDS)}  # paired by fold


def test_fold_and_repeat_axes_become_the_split() -> None:
    runs = pd.DataFrame({"task": ["graphcls", "graphcls", "graph"], "split": [-1, -1, 3],
                         "params.task.fold": ["4", "0", None], "params.task.repeat": ["0", "2", None],
                         "axis.task.fold": [4, 0, None], "axis.task.dataset": ["mutag", "mutag", None]})
    out, axes = folds_as_splits(runs, ["axis.task.fold", "axis.task.dataset", "axis.model.hidden"])
    assert list(out["split"]) == [4, 20, 3] and axes == ["axis.model.hidden"]
    with pytest.raises(ValueError, match=r"params\.task\.repeat"):
        folds_as_splits(runs.drop(columns="params.task.repeat"), [])
