"""The MLflow side of a tuned grid's search (:mod:`etbench.sweep.tune_stage`), run on the driver: closing the runs
of trials the scheduler stopped — from MLflow's per-epoch history, which the driver reads wherever it runs (the trial
folder may sit on another node's disk) — closing orphans of a restored search, and selecting each group's best run
within its budget.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from etbench.sweep import tuning as T
from etbench.sweep.trial import SweepError
from etbench.tracking import schema as S
from etbench.tracking.lookup import run_refs


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _close_stopped_run(ctx: dict[str, Any], config_hash: str, budget_epochs: int,
                       reported: list[dict[str, float]] | None = None) -> int | None:
    """Close the RUNNING run of a trial the scheduler stopped, from the epochs it recorded: MLflow's per-epoch
    history of the run (logged during the trial, readable wherever the driver runs), plus any epoch of the trial
    folder's metrics.json that MLflow lacks (a stop between writing metrics.json and logging; read only when the
    folder is visible here). best/* at the best validation epoch, status FINISHED, tag etbench.stopped_early only
    when fewer than ``budget_epochs`` epochs were recorded (:func:`etbench.sweep.tuning.stopped_at`). A run with no
    recorded epoch anywhere falls back to ``reported`` (the metric values the trial reported to Tune per epoch:
    what the scheduler judged), else is closed KILLED with the reason — never left RUNNING. Idempotent: only a
    RUNNING run is touched. Returns the epochs recorded when cut short, else None."""
    from mlflow.entities import Metric

    refs = run_refs(ctx["uri"], ctx["experiment"], config_hash=config_hash)
    running = [r for r in refs if r.status == "RUNNING"]
    client = _client(ctx["uri"])
    file_rows = _folder_rows(Path(ctx["trials"]) / config_hash)
    if not running:  # closed before (idempotent): what the newest run of the hash recorded
        return T.stopped_at(_epoch_rows(client, refs[0].run_id, file_rows)[0] if refs else file_rows, budget_epochs)
    metric, sign = ctx["metric"], 1.0 if ctx["mode"] == "min" else -1.0
    cut: int | None = None
    ts = int(time.time() * 1000)
    for n, run in enumerate(running):
        rows, missing = _epoch_rows(client, run.run_id, file_rows)
        if not rows and reported:  # stopped before rank 0 wrote its epochs: the reports the scheduler judged
            rows, missing = list(reported), list(enumerate(reported, start=1))
        cut = T.stopped_at(rows, budget_epochs) if n == 0 else cut
        if not rows:
            why = ("stopped by the scheduler before any epoch reached MLflow, and the trial folder "
                   f"{Path(ctx['trials']) / config_hash} holds no metrics.json readable here")
            client.set_tag(run.run_id, S.TAG_CLOSED_REASON, why)
            client.set_tag(run.run_id, S.TAG_ERROR, why)
            client.set_terminated(run.run_id, status="KILLED")
            continue
        points = [Metric(k, float(v), ts, step) for step, row in missing for k, v in row.items()
                  if k != "epoch" and isinstance(v, int | float) and math.isfinite(v)]
        for j in range(0, len(points), 1000):
            client.log_batch(run.run_id, metrics=points[j : j + 1000])
        scored = [(i, r) for i, r in enumerate(rows) if isinstance(r.get(metric), int | float)
                  and math.isfinite(r[metric])]
        if scored:
            i, best = min(scored, key=lambda ir: (sign * ir[1][metric], ir[0]))
            pts = [Metric(f"best/{k}", float(v), ts, 0) for k, v in best.items()
                   if "/" in k and isinstance(v, int | float) and math.isfinite(v)]
            client.log_batch(run.run_id, metrics=[*pts, Metric("best/epoch", float(i + 1), ts, 0)])
        stop = T.stopped_at(rows, budget_epochs)
        if stop is not None:
            client.set_tag(run.run_id, S.TAG_STOPPED_EARLY, f"asha at epoch {stop}")
        client.set_terminated(run.run_id, status="FINISHED")
    return cut


_NOT_PER_EPOCH = ("best/", "cost/", "energy/")  # summary metrics (step 0, or descent steps), never an epoch


def _folder_rows(folder: Path) -> list[dict[str, Any]]:
    """The trial folder's metrics.json rows, or none when the folder is not readable here (another node's disk)."""
    try:
        rows = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _epoch_rows(client: Any, run_id: str, file_rows: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[tuple[int, dict[str, Any]]]]:
    """One row per recorded epoch (epoch ``i`` at index ``i - 1``): MLflow's history of the run (an epoch is a
    step of ``train/loss``, logged at every epoch of every task), each filled in with metrics.json's values MLflow
    lacks; epochs only metrics.json holds are appended. Also returns those file-only (step, row) pairs, for MLflow."""
    from etbench.tracking.mlflow_log import EPOCH_KEY

    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith(_NOT_PER_EPOCH)]
    history = {k: [m for m in client.get_metric_history(run_id, k) if m.step >= 1] for k in keys}
    steps = {m.step for m in history.get(EPOCH_KEY, [])} or {m.step for ms in history.values() for m in ms}
    by_step: dict[int, dict[str, Any]] = {s: {} for s in steps}
    for k, ms in history.items():
        for m in sorted(ms, key=lambda m: m.timestamp):  # a step logged twice: the later value
            if m.step in by_step:
                by_step[m.step][k] = m.value
    missing = []
    for i, row in enumerate(file_rows):
        values = {k: v for k, v in row.items() if k != "epoch"}
        if i + 1 in by_step:
            by_step[i + 1] = {**values, **by_step[i + 1]}
        else:
            by_step[i + 1] = values
            missing.append((i + 1, values))
    top = max(by_step, default=0)
    return [{"epoch": float(s), **by_step.get(s, {})} for s in range(1, top + 1)], missing


def _close_orphans(ctx: dict[str, Any], seen: set[str]) -> None:
    """Tuning runs of this group left RUNNING by a killed driver whose configuration Tune never resumed."""
    client = _client(ctx["uri"])
    exp = client.get_experiment_by_name(ctx["experiment"])
    if exp is None:
        return
    flt = (f"tags.`{S.TAG_TUNE_GROUP}` = '{ctx['gid']}' and tags.`{S.TAG_STAGE}` = '{S.STAGE_TUNE}' and "
           f"attributes.status = 'RUNNING'")
    for r in client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000):
        if r.data.tags.get(S.TAG_CONFIG_HASH) not in seen:
            client.set_tag(r.info.run_id, S.TAG_ERROR, "interrupted search trial that the restored search dropped")
            client.set_terminated(r.info.run_id, status="KILLED")


def tuning_runs(uri: str, experiment: str, gid: str) -> list[Any]:
    """All MLflow runs of group ``gid``'s search."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = f"tags.`{S.TAG_TUNE_GROUP}` = '{gid}' and tags.`{S.TAG_STAGE}` = '{S.STAGE_TUNE}'"
    return list(client.search_runs([exp.experiment_id], filter_string=flt, max_results=10_000))


def select(uri: str, experiment: str, g: T.Group, grid: str = "") -> dict[str, Any] | None:
    """The FINISHED tuning run of ``g`` with the best validation metric (from MLflow, never test metrics).

    Refuses (SweepError) when the group's search evaluated more configurations than its budget — distinct config
    hashes of its FINISHED or FAILED tuning runs: a restored search whose state lagged behind its trials drew
    configurations again, or another search wrote into the experiment. Selecting then would give this model more
    tries than the others."""
    runs = [r for r in tuning_runs(uri, experiment, g.gid) if r.data.tags.get(S.TAG_SUPERSEDED) != "true"]
    evaluated = {r.data.tags.get(S.TAG_CONFIG_HASH) or r.info.run_id for r in runs
                 if r.info.status in ("FINISHED", "FAILED")}
    if len(evaluated) > g.budget.configurations:
        raise SweepError(f"{grid or experiment}: tuning group {g.gid} has {len(evaluated)} evaluated configurations "
                         f"in MLflow (experiment {experiment!r}, store {uri}) but its budget is "
                         f"{g.budget.configurations}; a restored search drew configurations again, or another "
                         f"search wrote into this experiment. Selecting among them would give {g.model} more tries "
                         f"than its budget: start the search over under another tracking.experiment (or storage), "
                         f"or delete the extra tuning runs")
    rows = [{"run_id": r.info.run_id, "value": r.data.metrics.get(f"best/{g.metric}"), "start": r.info.start_time,
             "params": json.loads(r.data.tags.get(S.TAG_TUNE_PARAMS, "{}"))}
            for r in runs if r.info.status == "FINISHED"]
    return T.select_best(rows, g.mode)
