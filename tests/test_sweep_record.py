"""How a finished Tune grid is counted: only a trial that returned its final result is "finished"."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from etbench.sweep.trial import NOT_FINISHED, SweepResult, record_results


def _result(h: str, metrics: dict | None, error: Exception | None = None) -> SimpleNamespace:
    return SimpleNamespace(config={"trial": {"config_hash": h}}, metrics=metrics, error=error)


def test_interrupted_trials_are_not_counted_finished() -> None:
    # the shapes tuner.fit() hands back after a Ctrl-C: the trials that ran to the end returned run_trial's dict;
    # the one running at the interrupt reported nothing final (metrics None or only Tune's own keys); a pending
    # one never started
    grid = [
        _result("a", {"status": "finished", "config_hash": "a", "best/val/loss": 0.1, "finished_unix": 1.0}),
        _result("b", {"status": "skipped", "config_hash": "b"}),
        _result("c", {"status": "diverged", "config_hash": "c", "error": "loss is nan at epoch 2"}),
        _result("d", None),
        _result("e", {"training_iteration": 0, "trial_id": "x"}),
        _result("f", {}, error=RuntimeError("worker died")),
    ]
    res = SweepResult(grid="g", experiment="e", tracking_uri="sqlite:///x", results_dir=Path("."), planned=6)
    record_results(grid, res)
    assert res.finished == ["a"] and res.skipped == ["b"]
    assert res.failed == {"c": "loss is nan at epoch 2", "d": NOT_FINISHED, "e": NOT_FINISHED, "f": "worker died"}
    assert "--resume" in NOT_FINISHED
