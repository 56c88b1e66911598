"""Parallel coordinates and fANOVA importance of tuning searches (issue 28.3), on tuning tables with a known answer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from etbench.analysis.tuning_plots import (
    full_budget_tuning_runs,
    importance_table,
    parallel_table,
    scaled,
    write_tuning_plots,
)


def searched(n: int = 24, seed: int = 0, stopped: int = 0) -> pd.DataFrame:
    """A search whose validation MSE depends on the learning rate only (a bowl in log lr at 1e-3); hidden width
    and weight decay are drawn but do nothing. ``stopped`` more runs were cut short by ASHA with awful scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + stopped):
        lr = float(10 ** rng.uniform(-4, -2))
        hidden, wd = int(rng.choice([32, 64])), float(rng.choice([0.0, 1e-4]))
        value = (math.log10(lr) + 3) ** 2 + 0.01 * rng.standard_normal()
        cut = i >= n
        rows.append({"run_id": f"r{i}", "stage": "tune", "group": "et-a", "model": "et", "dataset": "digits",
                     "status": "FINISHED", "metric": "val/mse", "mode": "min",
                     "params": {"train.lr": lr, "model.hidden": hidden, "train.weight_decay": wd},
                     "stopped_early": "asha at epoch 2" if cut else None, "best/val/mse": 100.0 if cut else value})
    rows.append({"run_id": "f0", "stage": "final", "group": "et-a", "model": "et", "dataset": "digits",
                 "status": "FINISHED", "metric": "val/mse", "mode": "min", "params": {"train.lr": 1e-3},
                 "stopped_early": None, "best/val/mse": 0.0})
    return pd.DataFrame(rows)


def test_only_full_budget_tuning_runs_are_used() -> None:
    runs = full_budget_tuning_runs(searched(n=10, stopped=3))
    assert sorted(runs["run_id"]) == sorted(f"r{i}" for i in range(10))  # no stopped run, no final run
    assert (runs["value"] < 100).all()


def test_axes_are_scaled_by_kind() -> None:
    assert scaled([1e-4, 1e-3, 1e-2]).tolist() == pytest.approx([0.0, 0.5, 1.0])  # log: spans ≥ 10×
    assert scaled([2.0, 3.0, 4.0]).tolist() == pytest.approx([0.0, 0.5, 1.0])  # linear
    assert scaled(["b", "a", "c", "a"]).tolist() == pytest.approx([0.5, 0.0, 1.0, 0.0])  # sorted categories
    assert scaled([0.3, 0.3]).tolist() == [0.5, 0.5]  # never varied


def test_the_knob_that_matters_gets_the_importance() -> None:
    imp = importance_table(full_budget_tuning_runs(searched(n=48, stopped=4))).set_index("param")["importance"]
    assert imp["train.lr"] > 0.8, imp
    assert imp["model.hidden"] < 0.1 and imp["train.weight_decay"] < 0.1, imp
    assert imp.sum() == pytest.approx(1.0)


def test_too_few_runs_or_nothing_varied_gives_no_number() -> None:
    few = importance_table(full_budget_tuning_runs(searched(n=3)))
    assert few["importance"].isna().all() and "3 full-budget runs (< 4)" in few["note"].iloc[0]
    flat = searched(n=6)
    flat["params"] = [{"train.lr": 1e-3}] * len(flat)
    none = importance_table(full_budget_tuning_runs(flat))
    assert none["importance"].isna().all() and none["note"].iloc[0] == "no hyper-parameter varied"


def test_files_and_section_are_written(tmp_path: Path) -> None:
    (tmp_path / "figures").mkdir()
    (tmp_path / "tables").mkdir()
    df = pd.concat([searched(n=8), searched(n=6, seed=1).assign(group="vit-a", model="vit")], ignore_index=True)
    tables, figures, section = write_tuning_plots(df, tmp_path)
    assert all(p.stat().st_size > 0 for p in tables + figures)
    par = pd.read_csv(tmp_path / "figures" / "tuning_parallel.csv")
    assert len(par) == (8 + 6) * 3 and par["scaled"].between(0, 1).all()  # a row per run and hyper-parameter
    assert set(par["group"]) == {"et-a", "vit-a"}
    md = (tmp_path / "tables" / "tuning_importance.md").read_text()
    assert md.count("| et-a |") == 3 and md.count("| vit-a |") == 3
    assert "fANOVA" in section and "stopped early are left out" in section.replace("\n", " ")
    assert parallel_table(full_budget_tuning_runs(df.iloc[:0])).empty
