"""A Ray Tune callback that prints one line per finished/failed trial and a running count."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback


class TrialProgress(Callback):
    """`[3/8] FINISHED et steps=4 seed=0 (a1b2c3d4e5f6) 41 s  val_mse_masked=0.31`."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.started: dict[str, float] = {}

    def _line(self, trial: Any, status: str, extra: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        p = trial.config.get("trial", {})
        took = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        print(f"[{self.done}/{self.total}] {status} {p.get('run_name', trial.trial_id)} ({p.get('config_hash')}) "
              f"{took:.0f} s {extra}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        status = {"diverged": "FAILED (diverged)", "skipped": "SKIPPED"}.get(r.get("status", ""), "FINISHED")
        shown = {k: round(v, 4) for k, v in r.items() if k.startswith("val_") and isinstance(v, float)}
        self._line(trial, status, " ".join(f"{k}={v}" for k, v in list(shown.items())[:3]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "FAILED")
