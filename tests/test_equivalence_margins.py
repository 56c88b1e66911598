"""Issue 27.4: equivalence margins declared by the grid (``analysis: {equivalence_margins: ...}``).

The grid file's section is validated on load (known metric of the grid's task, δ > 0, no other keys) and changes no
trial's config hash; opening the grid's parent run records it as a tag; ``make_report`` built from the store alone
reads the tag and prints the TOST verdict, checked against scipy's one-sided one-sample t-tests on the paired
differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from scipy import stats

from etbench.analysis import AnalysisError
from etbench.analysis.margins import declared_margins, for_metrics, parse_margins_tag
from etbench.sweep.grid import GridError, expand, load_grid
from etbench.tracking import schema as S

BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003}}
MSE = "best/test/mse_masked"


def _grid(tmp: Path, analysis: Any = None, name: str = "eq", base: dict[str, Any] | None = None,
          models: tuple[str, ...] = ("et", "vit")) -> Path:
    raw: dict[str, Any] = {"name": name, "base": base or BASE, "models": list(models), "seeds": [0, 1]}
    if analysis is not None:
        raw["analysis"] = analysis
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("analysis", "expected"), [
    ({"equivalence_margins": {"mse": 0.01}}, r"unknown metric\(s\) \['mse'\]; allowed: acc, auprc, auroc, macro_f1, "
                                             r"mse_masked, psnr, rec_at_k"),
    ({"equivalence_margins": {"best/test/mse_masked": 0.01}}, r"unknown metric.*without best/test/"),
    ({"equivalence_margins": {"mse_masked": 0.0}}, r"equivalence_margins\.mse_masked: Input should be greater than 0"),
    ({"equivalence_margins": {"mse_masked": -0.005}}, r"equivalence_margins\.mse_masked: Input should be greater"),
    ({"equivalence_margins": {"mse_masked": float("inf")}}, r"equivalence_margins\.mse_masked: .*finite"),
    ({"equivalence_margins": {"mse_masked": "small"}}, r"equivalence_margins\.mse_masked: .*valid number"),
    ({"margins": {"mse_masked": 0.01}}, r"analysis\.margins: Extra inputs are not permitted"),
    ({"equivalence_margins": {"auroc": 0.01}}, r"analysis\.equivalence_margins: metric\(s\) \['auroc'\] are not "
                                               r"logged by this grid's task\(s\) image; allowed: mse_masked, psnr"),
])
def test_a_bad_margin_is_refused_naming_file_field_and_allowed_values(tmp_path: Path, analysis: dict[str, Any],
                                                                     expected: str) -> None:
    path = _grid(tmp_path, analysis)
    with pytest.raises(GridError, match=expected) as err:
        load_grid(path)
    assert str(path) in str(err.value)


def test_margins_change_no_config_hash(tmp_path: Path) -> None:
    plain = expand(load_grid(_grid(tmp_path, name="plain")))
    declared = load_grid(_grid(tmp_path, {"equivalence_margins": {"mse_masked": 0.005, "psnr": 0.2}}, name="decl"))
    assert declared.analysis.equivalence_margins == {"mse_masked": 0.005, "psnr": 0.2}
    assert [t.config_hash for t in expand(declared)] == [t.config_hash for t in plain] and len(plain) == 4
    graph = {"task": {"kind": "graph", "dataset": "amazon_upu"}, "train": {"epochs": 1}}
    assert load_grid(_grid(tmp_path, {"equivalence_margins": {"auprc": 0.01}}, name="g", base=graph,
                           models=("et", "mlp")))


def test_margin_lookup_and_tag_parsing() -> None:
    assert for_metrics([MSE, "best/test/psnr"], {"mse_masked": 0.005}) == {MSE: 0.005}
    assert for_metrics([MSE], {MSE: 0.01, "mse_masked": 0.005}) == {MSE: 0.01}  # the full name wins
    assert parse_margins_tag('{"mse_masked": 0.005}') == {"mse_masked": 0.005}
    for bad in ("[1]", '{"mse_masked": 0}', '{"mse_masked": true}', "{", '{"x": "1"}'):
        with pytest.raises(ValueError):
            parse_margins_tag(bad)


# --- from the grid file to the report ----------------------------------------------------------------------------
ET = np.array([0.300, 0.320, 0.310, 0.290, 0.330, 0.305])
BASELINES = {  # model → its mse per seed: one equivalent to the ET within 0.005, one clearly not
    "vit": ET + np.array([0.0010, -0.0010, 0.0005, 0.0000, -0.0005, 0.0008]),
    "vit-tied": ET - np.array([0.010, 0.012, 0.009, 0.011, 0.010, 0.013]),
}
MARGIN = 0.005


def _log_trial(client: MlflowClient, exp_id: str, model: str, seed: int, mse: float, parent: str) -> None:
    tags = {S.TAG_TASK: "image", S.TAG_MODEL: model, S.TAG_DATASET: "digits", S.TAG_PROTOCOL: "masked-completion",
            S.TAG_SEED: str(seed), S.TAG_SPLIT: "-1", S.TAG_PAPER_COMPARABLE: "false", S.TAG_GRID: "eq",
            S.TAG_CONFIG_HASH: f"{model}-{seed}", S.TAG_PARENT_RUN: parent}
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(MSE, float(mse), 1_700_000_000_000, 0)])
    client.set_terminated(run_id, "FINISHED")


def _scipy_tost(d: np.ndarray, margin: float) -> float:
    low = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    high = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(low, high))


def test_a_grid_declared_margin_reaches_the_report_from_the_store_alone(tmp_path: Path) -> None:
    from etbench.analysis.report import make_report
    from etbench.sweep import grid_parent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid_file = _grid(tmp_path, {"equivalence_margins": {"mse_masked": MARGIN}})
    spec = load_grid(grid_file)
    parent = grid_parent.open_parent(uri=uri, experiment="eq", grid="eq", grid_file=grid_file,
                                     root=str(tmp_path / "results"), artifact_root=tmp_path / "artifacts",
                                     files={}, progress=False)
    assert parent is not None
    client = MlflowClient(uri)
    assert json.loads(client.get_run(parent).data.tags[S.TAG_ANALYSIS_MARGINS]) == {"mse_masked": MARGIN}
    exp_id = client.get_experiment_by_name("eq").experiment_id
    for seed, value in enumerate(ET):
        _log_trial(client, exp_id, "et", seed, value, parent)
        for model, values in BASELINES.items():
            _log_trial(client, exp_id, model, seed, values[seed], parent)
    assert declared_margins(client, "eq") == ({"mse_masked": MARGIN}, [parent])
    assert spec.analysis.equivalence_margins == {"mse_masked": MARGIN}

    grid_file.unlink()  # the report needs the store only
    result = make_report("eq", uri, tmp_path / "report", progress=lambda _: None)
    assert result.margins == {"mse_masked": MARGIN} and parent in result.margins_source
    assert f"mse_masked ±{MARGIN:g}" in result.index.read_text()
    data = pd.read_csv(tmp_path / "report" / "tables" / "compare_digits_masked-completion_per-split.csv")
    md = (tmp_path / "report" / "tables" / "compare_digits_masked-completion_per-split.md").read_text()
    assert "TOST (equivalence)" in md
    for model, values in BASELINES.items():
        row = data[data["baseline"] == model].iloc[0]
        p = _scipy_tost(ET - values, MARGIN)
        assert row["margin"] == MARGIN and row["p_tost"] == pytest.approx(p, rel=1e-9)
        assert bool(row["equivalent"]) is (p < 0.05)
    assert bool(data.loc[data["baseline"] == "vit", "equivalent"].iloc[0])  # the cases are what they claim
    assert not bool(data.loc[data["baseline"] == "vit-tied", "equivalent"].iloc[0])
    assert "equivalent within ±0.005" in md and "not shown equivalent within ±0.005" in md

    none = make_report("eq", uri, tmp_path / "report-none", margins={}, progress=lambda _: None)
    assert none.margins == {} and "TOST" not in (
        tmp_path / "report-none" / "tables" / "compare_digits_masked-completion_per-split.md").read_text()


def test_an_edited_grid_replaces_its_margins_and_parents_that_disagree_are_refused(tmp_path: Path) -> None:
    from etbench.sweep import grid_parent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def open_(path: Path, root: str) -> str:
        run_id = grid_parent.open_parent(uri=uri, experiment="eq", grid="eq", grid_file=path, root=str(tmp_path / root),
                                         artifact_root=tmp_path / "artifacts", files={}, progress=False)
        assert run_id is not None
        return run_id

    first = open_(_grid(tmp_path, {"equivalence_margins": {"mse_masked": 0.01}}), "r1")
    client = MlflowClient(uri)
    assert declared_margins(client, "eq") == ({"mse_masked": 0.01}, [first])
    assert open_(_grid(tmp_path), "r1") == first  # the same grid and results folder, edited: no margins now
    assert client.get_run(first).data.tags[S.TAG_ANALYSIS_MARGINS] == "{}"
    assert declared_margins(client, "eq") == ({}, [])
    open_(_grid(tmp_path, {"equivalence_margins": {"mse_masked": 0.01}}), "r1")
    second = open_(_grid(tmp_path, {"equivalence_margins": {"mse_masked": 0.02}}, name="eq2"), "r2")
    with pytest.raises(AnalysisError, match=f"different equivalence margins for mse_masked.*{second}|{second}.*"
                                            f"different equivalence margins"):
        declared_margins(client, "eq")


def test_sweep_plan_shows_the_declared_margins_and_the_checkpoint_retention(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from etbench.cli import main

    assert main(["sweep", "plan", str(_grid(tmp_path, {"equivalence_margins": {"psnr": 0.2, "mse_masked": 0.005}}))
                 ]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("checkpoints kept per trial {'keep_last': 1, 'keep_best': 1}; equivalence margins (TOST in "
                        "the report) {'mse_masked': 0.005, 'psnr': 0.2}")
    assert main(["sweep", "plan", str(_grid(tmp_path, name="none"))]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "checkpoints kept per trial {'keep_last': 1, 'keep_best': 1}"
