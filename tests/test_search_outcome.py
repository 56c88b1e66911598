"""How a tuned grid's search reads each Tune trial (etbench.sweep.tune_stage.search_outcome / trial_statuses): a
trial the scheduler stopped between epochs is closed as a (shorter) complete run, but one the driver's interruption
left without a final report is a failure to resume — never a complete run, and the search is not marked done.
(Issue 23: before this, both read as 'stopped by ASHA'.) The real ResultGrid path runs in every tuned test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from etbench.sweep.trial import SweepError
from etbench.sweep.tune_stage import search_outcome, trial_statuses


@pytest.mark.parametrize(("metrics", "error", "tune_status", "want"), [
    ({"status": "finished", "epoch": 4}, None, "TERMINATED", "finished"),
    ({"status": "diverged", "error": "NaN loss"}, None, "TERMINATED", "diverged"),
    ({"status": "skipped"}, None, "TERMINATED", "skipped"),
    ({"epoch": 2, "val_mse": 0.4}, None, "TERMINATED", "stopped"),      # ASHA cut it after epoch 2
    ({"epoch": 2, "val_mse": 0.4}, None, "RUNNING", "interrupted"),     # the driver stopped mid-trial
    ({"epoch": 2, "val_mse": 0.4}, None, "PAUSED", "interrupted"),
    ({}, None, "PENDING", "interrupted"),                               # never started before the interruption
    ({"epoch": 1}, RuntimeError("worker died"), "ERROR", "crashed"),
    ({"status": "finished"}, RuntimeError("late"), "ERROR", "crashed"),
])
def test_each_kind_of_trial_end(metrics: dict, error: object, tune_status: str, want: str) -> None:
    assert search_outcome(metrics, error, tune_status) == want


def test_statuses_follow_the_grid_order_and_a_mismatch_is_refused() -> None:
    trials = [SimpleNamespace(status="TERMINATED"), SimpleNamespace(status="RUNNING")]

    class Grid(list):
        _experiment_analysis = SimpleNamespace(trials=trials)

    assert trial_statuses(Grid([object(), object()])) == ["TERMINATED", "RUNNING"]
    with pytest.raises(SweepError, match="3 results but 2 trials"):
        trial_statuses(Grid([object(), object(), object()]))
