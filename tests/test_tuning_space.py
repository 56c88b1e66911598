"""Issue 27.2: the tuned plan shows each model's free dimensions and discrete combinations beside its budget, and
warns when two models' spaces differ by more than the grid allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench.cli import main
from etbench.sweep.tuning import SearchDim, space_size

LR = {"distribution": "loguniform", "low": 1e-4, "high": 0.1}
GRID: dict[str, Any] = {
    "name": "space_plan",
    "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
             "train": {"batch_size": 16, "warmup_epochs": 0}, "model": {"et": {"steps": 1}}},
    "models": ["et", "vit"],
    "seeds": [0, 1],
    "tuning": {"budget": {"configurations": 4, "epochs": 2},
               "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
               "models": {"et": {"space": {"train.lr": LR, "model.et.init": ["spec", "width"],
                                           "model.et.alpha": [0.5, 1.0], "train.weight_decay": [0.0]}},
                          "vit": {"space": {"train.lr": LR}}}},
}


def test_space_size_counts_free_dimensions_and_combinations() -> None:
    def dims(**kw: Any) -> dict[str, SearchDim]:
        return {k: SearchDim(**v) if isinstance(v, dict) else SearchDim(distribution="choice", values=v)
                for k, v in kw.items()}

    assert space_size(dims(a=[1, 2, 3], b=["x", "y"], c=[0.0])) == (2, 6)  # a one-value list is not free
    assert space_size(dims(a=[1, 2, 3], n={"distribution": "randint", "low": 2, "high": 5})) == (2, 12)
    assert space_size(dims(lr=LR, a=[1, 2])) == (2, None)  # continuous: unbounded combinations
    assert space_size({}) == (0, 1)


def _plan(tmp_path: Path, capsys: pytest.CaptureFixture[str], grid: dict[str, Any]) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["sweep", "plan", str(path)]) == 0
    return capsys.readouterr().out


def test_plan_prints_space_sizes_and_warns_on_unequal_effect(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = _plan(tmp_path, capsys, GRID)
    lines = {m: next(line for line in out.splitlines() if line.split()[:2] == [m, m]) for m in ("et", "vit")}
    assert "budget 4 configurations" in lines["et"] and "(3 free dimension(s), continuous)" in lines["et"]
    assert "(1 free dimension(s), continuous)" in lines["vit"]
    assert ("WARNING: search spaces of unequal effect: et searches 3 free dimension(s), vit 1 (more than "
            "tuning.space_ratio = 2 apart)") in out
    wide = {**GRID, "tuning": {**GRID["tuning"], "space_ratio": 3}}
    assert "WARNING" not in _plan(tmp_path, capsys, wide)
    discrete = {**GRID, "tuning": {**GRID["tuning"], "space_ratio": 3, "models": {
        "et": {"space": {"train.lr": [1e-3, 3e-3, 1e-2], "model.et.init": ["spec", "width"]}},
        "vit": {"space": {"train.lr": [1e-3, 3e-3], "train.weight_decay": [0.0, 1e-4]}}}}}
    out = _plan(tmp_path, capsys, discrete)
    assert "(2 free dimension(s), 6 discrete combinations)" in out and "4 discrete combinations)" in out
    assert "WARNING" not in out  # 6 vs 4 is within a factor 3
    discrete["tuning"]["space_ratio"] = 1.2
    assert ("et has 6 discrete combinations, vit 4 (more than tuning.space_ratio = 1.2 apart)"
            in _plan(tmp_path, capsys, discrete))


GRAPH: dict[str, Any] = {
    "name": "split_plan",
    "base": {"task": {"kind": "graph", "dataset": "synthetic", "protocol": "bwgnn"},
             "train": {"epochs": 2, "warmup_epochs": 0}},
    "models": ["et", "mlp"],
    "seeds": [0],
    "splits": [1, 2],
    "tuning": {"split": 0, "metric": "val/auprc", "mode": "max", "budget": {"configurations": 2, "epochs": 2},
               "scheduler": {"kind": "none"},
               "models": {"et": {"space": {"train.lr": [1e-3, 1e-2]}}, "mlp": {"space": {"train.lr": [1e-3, 1e-2]}}}},
}


def test_the_search_runs_on_its_own_split_outside_the_final_ones(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from etbench.sweep.grid import load_grid
    from etbench.sweep.tuning import final_configs, groups, tuning_config

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(GRAPH))
    spec = load_grid(path)
    for g in groups(spec):
        assert g.split == 0 and g.metric == "val/auprc"
        assert tuning_config(spec, g, {"train.lr": 1e-3}).task.split == 0  # type: ignore[union-attr]
        assert sorted(c.task.split for _, _, c in final_configs(spec, g, {"train.lr": 1e-3})) == [1, 2]  # type: ignore[union-attr]
    out = _plan(tmp_path, capsys, GRAPH)
    assert "search on split 0 (outside the final splits)" in out
    assert "ties on the validation value go to the searched values first in canonical JSON order" in out
    inside = {**GRAPH, "tuning": {**GRAPH["tuning"], "split": 2}}
    assert "search on split 2 — also a final split" in _plan(tmp_path, capsys, inside)
    default = {**GRAPH, "tuning": {k: v for k, v in GRAPH["tuning"].items() if k != "split"}}
    assert "search on split 1 — also a final split" in _plan(tmp_path, capsys, default)  # the grid's first split


def test_a_tuning_split_without_splits_is_refused(tmp_path: Path) -> None:
    from etbench.sweep.grid import GridError, load_grid
    from etbench.sweep.tuning import groups

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**GRID, "tuning": {**GRID["tuning"], "split": 0}}))
    with pytest.raises(GridError) as err:
        groups(load_grid(path), str(path))
    assert str(path) in str(err.value) and "tuning.split" in str(err.value) and "no splits" in str(err.value)


def test_selection_ties_go_to_the_searched_values_not_to_the_schedule() -> None:
    from etbench.sweep.tuning import select_best

    a = {"run_id": "r1", "value": 0.5, "start": 20, "params": {"train.lr": 0.001, "model.hidden": 64}}
    b = {"run_id": "r2", "value": 0.5, "start": 10, "params": {"train.lr": 0.01, "model.hidden": 32}}
    worse = {"run_id": "r0", "value": 0.4, "start": 0, "params": {"train.lr": 0.0001, "model.hidden": 16}}
    # canonical JSON sorts keys: {"model.hidden": 32, …} < {"model.hidden": 64, …}, so b wins the tie whichever of
    # the two started first (a re-run of the search may schedule them the other way round)
    for start_a, start_b in ((20, 10), (10, 20)):
        runs = [{**a, "start": start_a}, {**b, "start": start_b}, worse]
        assert select_best(runs, "max")["run_id"] == "r2" and select_best(runs[::-1], "max")["run_id"] == "r2"
    assert select_best([a, b, worse], "min")["run_id"] == "r0"
