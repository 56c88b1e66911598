"""What a grid left behind after faults, read from the tracking store and the trial folders alone.

The oracle of the chaos test (``tests/test_chaos.py``) and of ``etbench bench chaos`` (issue 23): for every planned
config hash exactly one FINISHED run (none lost, none duplicated), no run left RUNNING or SCHEDULED, every other run
closed with a reason, every FINISHED run's per-epoch validation history holding each epoch exactly once and equal to
the trial's ``metrics.json``, ``best/*`` equal to ``summary.json``, and ``cost/wall_s`` at least the sum of the
epochs' own times. :func:`audit` returns the counts and a list of readable problems (empty: nothing was lost).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.tracking import schema as S

HISTORY_KEY = "val/loss"  # every task's validation rows carry it (etbench.engine.loop)


@dataclass
class Audit:
    planned: int = 0
    finished: int = 0
    lost: list[str] = field(default_factory=list)  # planned hashes without a FINISHED run
    duplicated: list[str] = field(default_factory=list)  # planned hashes with more than one FINISHED run
    left_live: list[str] = field(default_factory=list)  # run ids still RUNNING/SCHEDULED
    unexplained: list[str] = field(default_factory=list)  # KILLED/FAILED runs without a reason
    attempts: dict[str, int] = field(default_factory=dict)  # hash → attempts (tracking.json)
    problems: list[str] = field(default_factory=list)

    @property
    def retried(self) -> int:
        """Trials that ran more than once (a retry, a restart or a --resume continued them)."""
        return sum(a > 1 for a in self.attempts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"planned": self.planned, "finished": self.finished, "runs_lost": len(self.lost),
                "runs_duplicated": len(self.duplicated), "runs_left_live": len(self.left_live),
                "runs_closed_without_reason": len(self.unexplained), "trials_retried": self.retried,
                "attempts": sum(self.attempts.values()), "problems": self.problems}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def audit(uri: str, experiment: str, planned: dict[str, int], trials: Path | str) -> Audit:
    """``planned``: config hash → epochs of every trial the grid planned; ``trials``: the grid's trial folders
    (``<storage>/<grid>/trials``). Superseded runs (``--force``) are not counted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else [r for r in client.search_runs([exp.experiment_id], max_results=50000)
                                   if r.data.tags.get(S.TAG_KIND) != S.KIND_GRID]
    out = Audit(planned=len(planned))
    for r in runs:
        status, tags = r.info.status, r.data.tags
        if status in ("RUNNING", "SCHEDULED"):
            out.left_live.append(r.info.run_id)
            out.problems.append(f"run {r.info.run_id} ({tags.get(S.TAG_CONFIG_HASH)}) is left {status}")
        elif status in ("KILLED", "FAILED") and not (tags.get(S.TAG_CLOSED_REASON) or tags.get(S.TAG_ERROR)):
            out.unexplained.append(r.info.run_id)
            out.problems.append(f"run {r.info.run_id} is {status} with no etbench.closed_reason/etbench.error")
    for h, epochs in sorted(planned.items()):
        done = [r for r in runs if r.data.tags.get(S.TAG_CONFIG_HASH) == h and r.info.status == "FINISHED"
                and r.data.tags.get(S.TAG_SUPERSEDED) != "true"]
        if not done:
            out.lost.append(h)
            out.problems.append(f"config hash {h}: no FINISHED run")
            continue
        if len(done) > 1:
            out.duplicated.append(h)
            out.problems.append(f"config hash {h}: {len(done)} FINISHED runs {[r.info.run_id for r in done]}")
        out.finished += 1
        folder = Path(trials) / h
        ident = folder / "tracking.json"
        if ident.exists():
            out.attempts[h] = int(json.loads(ident.read_text()).get("attempts", 1))
        out.problems += [f"config hash {h}: {p}" for p in _check_run(client, done[0], folder, epochs)]
    return out


def _check_run(client: Any, run: Any, folder: Path, epochs: int) -> list[str]:
    problems = []
    steps = [m.step for m in client.get_metric_history(run.info.run_id, HISTORY_KEY)]
    if sorted(steps) != list(range(1, epochs + 1)):
        problems.append(f"{HISTORY_KEY} history steps {sorted(steps)}, expected 1..{epochs} once each")
    metrics = folder / "metrics.json"
    if not metrics.exists():
        return [*problems, f"no {metrics}"]
    rows = json.loads(metrics.read_text())
    if [int(r["epoch"]) for r in rows] != list(range(1, epochs + 1)):
        problems.append(f"metrics.json epochs {[r['epoch'] for r in rows]}, expected 1..{epochs}")
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, HISTORY_KEY)}
    wrong = [int(r["epoch"]) for r in rows if int(r["epoch"]) in logged
             and not _close(logged[int(r["epoch"])], float(r[HISTORY_KEY]))]
    if wrong:
        problems.append(f"{HISTORY_KEY} in MLflow differs from metrics.json at epochs {wrong}")
    summary = folder / "summary.json"
    if summary.exists():
        best = json.loads(summary.read_text()).get("best", {})
        m = run.data.metrics
        off = [k for k, v in best.items() if isinstance(v, int | float) and f"best/{k}" in m
               and not _close(m[f"best/{k}"], float(v))]
        if off:
            problems.append(f"best/* in MLflow differ from summary.json: {off}")
        epoch_s = sum(float(r.get("time/epoch_s", 0.0)) for r in rows)
        wall = m.get("cost/wall_s")
        if wall is not None and wall + 1e-6 < epoch_s:
            problems.append(f"cost/wall_s {wall:.2f} < the epochs' own time {epoch_s:.2f}")
    else:
        problems.append(f"no {summary}")
    return problems


def trial_progress(trials: Path | str) -> dict[str, tuple[int, bool]]:
    """Config hash → (latest checkpointed epoch, finished) of every trial folder of a grid: when a fault now would
    hit a trial mid-run (the chaos test and ``etbench bench chaos`` time their faults by it)."""
    out = {}
    for folder in Path(trials).glob("*"):
        retained = folder / "checkpoints" / "retained.json"
        latest = json.loads(retained.read_text()).get("latest", 0) if retained.exists() else 0
        out[folder.name] = (int(latest), (folder / "summary.json").exists())
    return out


def final_rows(trials: Path | str, h: str) -> list[dict[str, float]]:
    """A trial's per-epoch rows (its metrics.json) for comparing with an uninterrupted reference run."""
    return json.loads((Path(trials) / h / "metrics.json").read_text())
