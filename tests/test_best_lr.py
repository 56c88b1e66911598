"""Issue 27.7: ablation grids with a learning-rate axis are reported with each cell at its best validation lr.

The choice against a direct pandas computation (mean validation metric per cell and lr, best wins, a tie to the
smaller lr), and a report from a real MLflow store of an ET-only steps × lr grid: the selection table, the
``…_lr-best-val`` results table whose numbers are the test metric of the chosen runs only, and its figures beside the
per-lr ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from etbench.analysis.best_lr import best_value_runs, lr_axis, selection_table, validation_metric
from etbench.tracking import schema as S

LR, STEPS = "axis.train.lr", "axis.model.steps"  # the ET's model.et.steps is tagged model.steps
VAL, TEST = "best/val/mse_masked", "best/test/mse_masked"
LRS = (0.0022, 0.0066, 0.02)
# (steps, lr) → validation mse per seed 0..2; the best lr differs by cell (T = 1: the largest, T = 4: the middle).
VALS = {(1, 0.0022): [0.30, 0.31, 0.29], (1, 0.0066): [0.25, 0.26, 0.27], (1, 0.02): [0.20, 0.22, 0.21],
        (4, 0.0022): [0.24, 0.23, 0.25], (4, 0.0066): [0.18, 0.17, 0.19], (4, 0.02): [0.40, 0.90, 0.35]}


def _frame() -> pd.DataFrame:
    rows = []
    for (steps, lr), vals in VALS.items():
        for seed, v in enumerate(vals):
            rows.append({"dataset": "digits", "protocol": "masked-completion", "model": "et", STEPS: steps, LR: lr,
                         "seed": seed, "split": -1, "metrics." + VAL: v, "metrics." + TEST: v + 0.01 * (seed + 1),
                         "task": "image"})
    return pd.DataFrame(rows)


def test_the_choice_is_the_best_mean_validation_lr_per_cell() -> None:
    runs = _frame()
    keys = ["dataset", "protocol", "model", STEPS]
    picked = best_value_runs(runs, LR, keys, VAL, higher=False)
    means = runs.groupby([STEPS, LR])["metrics." + VAL].mean().unstack()
    assert dict(picked.groupby(STEPS)[LR].first()) == {1: means.loc[1].idxmin(), 4: means.loc[4].idxmin()}
    assert dict(picked.groupby(STEPS)[LR].first()) == {1: 0.02, 4: 0.0066} and len(picked) == 6
    best_high = best_value_runs(runs, LR, keys, VAL, higher=True)  # the other direction picks the other end
    assert dict(best_high.groupby(STEPS)[LR].first()) == {1: 0.0022, 4: 0.02}
    tied = runs.assign(**{"metrics." + VAL: 0.5})
    assert set(best_value_runs(tied, LR, keys, VAL, higher=False)[LR]) == {0.0022}  # a tie: the smaller lr
    assert lr_axis(runs, [STEPS, LR]) == LR and lr_axis(runs[runs[LR] == 0.02], [STEPS, LR]) is None
    assert validation_metric(TEST) == VAL and validation_metric(VAL) is None
    table = selection_table(runs, LR, keys, VAL, False, "digits", "masked-completion")
    assert list(table.display["chosen train.lr"]) == ["0.02", "0.0066"]
    assert list(table.display["at the edge"]) == ["largest searched", ""]
    assert table.display.loc[1, "train.lr=0.0066"] == "0.18 (n=3)" and bool(table.bold.loc[1, "train.lr=0.0066"])
    assert not table.bold.loc[1, "train.lr=0.02"]


def _log(client: MlflowClient, exp_id: str, steps: int, lr: float, seed: int, val: float, test: float) -> None:
    tags = {S.TAG_TASK: "image", S.TAG_MODEL: "et", S.TAG_DATASET: "digits", S.TAG_PROTOCOL: "masked-completion",
            S.TAG_SEED: str(seed), S.TAG_SPLIT: "-1", S.TAG_PAPER_COMPARABLE: "false", S.TAG_GRID: "abl",
            S.TAG_AXIS_PREFIX + "model.steps": str(steps), S.TAG_AXIS_PREFIX + "train.lr": str(lr),
            S.TAG_CONFIG_HASH: f"{steps}-{lr}-{seed}"}
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(VAL, val, 1_700_000_000_000, 0), Metric(TEST, test, 1_700_000_000_000, 0)])
    client.set_terminated(run_id, "FINISHED")


def test_the_report_shows_each_cell_at_its_best_validation_lr(tmp_path: Path) -> None:
    from etbench.analysis.report import make_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("abl", artifact_location=(tmp_path / "artifacts").as_uri())
    frame = _frame()
    for _, r in frame.iterrows():
        _log(client, exp_id, int(r[STEPS]), float(r[LR]), int(r["seed"]), float(r["metrics." + VAL]),
             float(r["metrics." + TEST]))
    out = tmp_path / "report"
    result = make_report("abl", uri, out, progress=lambda _: None)
    names = {p.name for p in result.tables + result.figures}
    assert {"lr_selection_digits_masked-completion.csv", "results_digits_masked-completion_per-split_lr-best-val.csv",
            "steps_digits_masked-completion_mse_masked_lr-best-val.png",
            "steps_digits_masked-completion_mse_masked_lr-0.02.png"} <= names  # per-lr figures stay
    best = pd.read_csv(out / "tables" / "results_digits_masked-completion_per-split_lr-best-val.csv")
    for steps, lr in ((1, 0.02), (4, 0.0066)):
        row = best[best[STEPS] == steps].iloc[0]
        test = np.array(VALS[(steps, lr)]) + 0.01 * np.arange(1, 4)
        assert row[f"chosen {LR}"] == lr and row[f"{TEST}:n"] == 3
        assert row[f"{TEST}:mean"] == pytest.approx(test.mean())
    md = (out / "tables" / "results_digits_masked-completion_per-split_lr-best-val.md").read_text()
    assert "train.lr (best val)" in md and "each cell at the train.lr of its best mean val mse_masked" in md
    assert "steps_digits_masked-completion_mse_masked_lr-best-val" in result.index.read_text()
    assert "each cell at the train.lr" in result.titles["steps_digits_masked-completion_mse_masked_lr-best-val"]
    assert result.warnings == []
