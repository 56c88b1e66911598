"""The sweep's progress line (issue 28.5): done / running / failed / left and an ETA from the plan's estimates."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from etbench.sweep.progress import TrialProgress, eta_seconds, fmt_eta


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def trial(tid: str, config_hash: str, result: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(trial_id=tid, config={"trial": {"config_hash": config_hash, "run_name": f"et {tid}"}},
                           last_result=result or {})


def test_eta_scales_the_plan_by_the_observed_speed() -> None:
    # two done, planned 10 s each, took 20 s each: the machine runs at half the planned speed
    assert eta_seconds([10.0, 10.0], [(10.0, 5.0)], [(10.0, 20.0), (10.0, 20.0)], slots=2) == pytest.approx(
        (2 * 20.0 + (20.0 - 5.0)) / 2)
    assert eta_seconds([10.0], [], [], slots=1) is None  # nothing finished yet: no ETA
    assert fmt_eta(None) == "" and fmt_eta(30) == " · ETA ~30 s" and fmt_eta(600) == " · ETA ~10 min"
    assert fmt_eta(3 * 3600) == " · ETA ~3.0 h"


def test_lines_count_running_failed_and_left_with_an_eta() -> None:
    clock = Clock()
    est = {"h1": 10.0, "h2": 10.0, "h3": 40.0, "h4": 10.0}
    p = TrialProgress(4, enabled=False, concurrency=2, estimates=est, clock=clock)
    p.on_trial_start(0, [], trial("a", "h1"))
    p.on_trial_start(0, [], trial("b", "h2"))
    clock.t = 20.0  # twice the planned 10 s
    p.on_trial_complete(0, [], trial("a", "h1", {"val_mse": 0.123456}))
    # left: h3 (unstarted, 40 s planned) and h4; b runs for 20 s of its scaled 20 s
    assert p.lines[-1].startswith("[1/4 done · 1 running · 2 left · ETA ~")
    assert p.lines[-1].endswith("FINISHED et a (h1) 20 s val_mse=0.1235")
    assert "ETA ~50 s" in p.lines[-1]  # ((40 + 10) × 2 + 0) / 2 slots
    p.on_trial_start(0, [], trial("c", "h3"))
    clock.t = 25.0
    p.on_trial_error(0, [], trial("b", "h2"))
    assert p.lines[-1].startswith("[2/4 done · 1 running · 1 failed · 1 left") and " FAILED et b" in p.lines[-1]
    p.on_trial_start(0, [], trial("d", "h4"))
    clock.t = 45.0
    p.on_trial_complete(0, [], trial("d", "h4", {"status": "diverged"}))
    clock.t = 100.0
    p.on_trial_complete(0, [], trial("c", "h3"))
    assert p.lines[-1].startswith("[4/4 done · 0 running · 2 failed · 0 left]")  # no ETA at the end
    assert p.failed == 2 and [a for _, a in p.finished] == [20.0, 80.0]


def test_without_estimates_the_mean_finished_time_stands_in() -> None:
    clock = Clock()
    p = TrialProgress(3, enabled=False, concurrency=1, clock=clock)
    p.on_trial_start(0, [], trial("a", "h1"))
    clock.t = 30.0
    p.on_trial_complete(0, [], trial("a", "h1"))
    assert p.lines[-1].startswith("[1/3 done · 0 running · 2 left · ETA ~60 s]")
