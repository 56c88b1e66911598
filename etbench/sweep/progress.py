"""A Ray Tune callback that prints one line per finished/failed trial: counts, an ETA, and the trial's result.

`[3/8 done · 2 running · 1 failed · 3 left · ETA ~4 min] FINISHED et steps=4 seed=0 (a1b2c3d4e5f6) 41 s
val_mse_masked=0.31`

The ETA spreads the work left over the concurrent slots. With the plan's cost estimate per trial (seconds, keyed by
config hash: what ``etbench sweep plan`` prints) it is that estimate of the unstarted and running trials, scaled by
how the finished trials' real times compared with their estimates; without one, the finished trials' mean time
stands in for every trial left. No ETA before the first trial ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback


def eta_seconds(left: list[float], running_elapsed: list[tuple[float, float]], done: list[tuple[float, float]],
                slots: int) -> float | None:
    """Seconds until the last trial ends: ``left`` the estimates of unstarted trials, ``running_elapsed``
    (estimate, elapsed) of running ones, ``done`` (estimate, actual) of finished ones; ``slots`` trials at once."""
    if not done:
        return None
    est, actual = sum(e for e, _ in done), sum(a for _, a in done)
    scale = actual / est if est > 0 else 1.0
    work = sum(left) * scale + sum(max(0.0, e * scale - t) for e, t in running_elapsed)
    return work / max(1, slots)


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 90:
        return f" · ETA ~{max(1, round(seconds))} s"
    if seconds < 5400:
        return f" · ETA ~{round(seconds / 60)} min"
    return f" · ETA ~{seconds / 3600:.1f} h"


class TrialProgress(Callback):
    """Counts, ETA and one line per ended trial (``estimates``: config hash → planned seconds, optional)."""

    def __init__(self, total: int, enabled: bool = True, *, concurrency: int = 1,
                 estimates: dict[str, float] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.enabled, self.done, self.failed = total, enabled, 0, 0
        self.concurrency, self.estimates, self.clock = concurrency, estimates or {}, clock
        self.started: dict[str, float] = {}
        self.hash_of: dict[str, str] = {}
        self.finished: list[tuple[float, float]] = []  # (estimate, actual seconds)
        self.lines: list[str] = []

    def _estimate(self, config_hash: str | None) -> float:
        if config_hash in self.estimates:
            return float(self.estimates[config_hash])
        known = [a for _, a in self.finished]
        return sum(known) / len(known) if known else 0.0

    def counts(self) -> str:
        running = len(self.started)
        left = max(0, self.total - self.done - running)
        now = self.clock()
        if self.estimates:
            pending = sorted(set(self.estimates) - set(self.hash_of.values()))[:left]
            left_est = [self._estimate(h) for h in pending] + [self._estimate(None)] * (left - len(pending))
        else:
            left_est = [self._estimate(None)] * left
        run = [(self._estimate(self.hash_of.get(t)), now - s) for t, s in self.started.items()]
        eta = eta_seconds(left_est, run, self.finished, self.concurrency) if self.done < self.total else None
        failed = f" · {self.failed} failed" if self.failed else ""
        return f"[{self.done}/{self.total} done · {running} running{failed} · {left} left{fmt_eta(eta)}]"

    def _ended(self, trial: Any, status: str, extra: str = "") -> None:
        self.done += 1
        self.failed += status.startswith("FAILED")
        start = self.started.pop(trial.trial_id, None)
        took = self.clock() - start if start is not None else 0.0
        p = trial.config.get("trial", {})
        if start is not None and not status.startswith("FAILED") and status != "SKIPPED":
            self.finished.append((self._estimate(p.get("config_hash")), took))
        line = (f"{self.counts()} {status} {p.get('run_name', trial.trial_id)} ({p.get('config_hash')}) "
                f"{took:.0f} s {extra}").rstrip()
        self.lines.append(line)
        if self.enabled:
            print(line, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = self.clock()
        h = trial.config.get("trial", {}).get("config_hash")
        if h:
            self.hash_of[trial.trial_id] = h

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        status = {"diverged": "FAILED (diverged)", "skipped": "SKIPPED"}.get(r.get("status", ""), "FINISHED")
        shown = {k: round(v, 4) for k, v in r.items() if k.startswith("val_") and isinstance(v, float)}
        self._ended(trial, status, " ".join(f"{k}={v}" for k, v in list(shown.items())[:3]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "FAILED")
