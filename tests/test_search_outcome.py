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


def test_a_stopped_trials_reported_epochs_are_read_from_tunes_result() -> None:
    """A distributed trial that ASHA stopped right after its ranks' report may have written no epoch anywhere yet:
    the stage closes its run from what it reported to Tune (epochs 1..k of the search metric), never from a gap."""
    from types import SimpleNamespace

    import pandas as pd

    from etbench.sweep.tune_stage import _reported_rows
    from etbench.sweep.tuning import metric_key

    key = metric_key("val/mse_masked")
    df = pd.DataFrame({"epoch": [1, 2], key: [0.5, 0.4]})
    assert _reported_rows(SimpleNamespace(metrics_dataframe=df), "val/mse_masked") == [
        {"val/mse_masked": 0.5}, {"val/mse_masked": 0.4}]
    gap = pd.DataFrame({"epoch": [1, 3], key: [0.5, 0.4]})  # not epochs 1..k: nothing to stand for the run
    assert _reported_rows(SimpleNamespace(metrics_dataframe=gap), "val/mse_masked") == []
    assert _reported_rows(SimpleNamespace(metrics_dataframe=None), "val/mse_masked") == []
