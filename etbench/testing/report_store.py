"""Schema-faithful MLflow stores of many FINISHED etbench runs, so ``etbench bench report`` can be reproduced.

The store is what a sweep of an image grid (et + vit over steps × memories × lr × seeds, masked digits) would
leave: the grid's own trials (``etbench.sweep.grid.expand``: real resolved configs, hashes and axis values), the
tags, params and metric names that :class:`etbench.tracking.mlflow_log.RunTracker` writes (its own ``start``,
``log_params``, ``log_epoch`` and ``log_summary`` are driven with a recording client), and the artifacts of a real
run (config.json, metrics.csv, summary.json, energy_trace.csv, reconstruction.png, memories.png). Values come from
a smooth synthetic response surface plus seed noise. Rows go into MLflow's SQL tables in batches of runs, through
MLflow's own SQLAlchemy table definitions (one transaction per batch instead of ~6 per run), which makes a
30,000-run store a matter of minutes.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

from etbench.sweep.grid import GridSpec, Trial, expand
from etbench.tracking import schema as S
from etbench.tracking.mlflow_log import RunTracker, axis_tag_name, ensure_experiment

EPOCH_KEYS = ("train/loss", "lr", "time/epoch_s", "val/loss", "val/mse_chosen", "val/mse_masked", "val/psnr",
              "test/loss", "test/mse_chosen", "test/mse_masked", "test/psnr")
COMPLETE = "store.json"
T0_MS = 1_790_000_000_000


@dataclass(frozen=True)
class StoreShape:
    """Axis values of the generated grid: runs = len(steps) · len(lrs) · len(seeds) · (max(1, len(memories)) + 1);
    no memories axis when ``memories`` is empty."""

    steps: tuple[int, ...]
    memories: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int = 5
    trace_samples: int = 8

    @property
    def runs(self) -> int:
        return len(self.steps) * len(self.lrs) * len(self.seeds) * (max(1, len(self.memories)) + 1)


_STEPS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20)
_LRS = (3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2, 3e-2)
SHAPES: dict[int, StoreShape] = {
    24: StoreShape((1, 2), (16, 32), (1e-3,), tuple(range(4)), epochs=2, trace_samples=2),  # smoke / unit test
    200: StoreShape(_STEPS[:5], (16, 64, 128, 256), (5e-4, 1e-3), tuple(range(4))),
    1000: StoreShape(_STEPS[:5], (8, 16, 32, 64, 96, 128, 192, 256, 512), (5e-4, 1e-3, 2e-3, 5e-3), tuple(range(5))),
    5000: StoreShape(_STEPS, tuple(16 * (i + 1) for i in range(19)), (3e-4, 5e-4, 1e-3, 2e-3, 5e-3),
                     tuple(range(5))),
    30000: StoreShape(_STEPS, tuple(16 * (i + 1) for i in range(49)), _LRS, tuple(range(6))),
}


def shape_for(runs: int) -> StoreShape:
    """The preset shape with ``runs`` runs; raise naming the sizes there are."""
    if runs not in SHAPES:
        raise ValueError(f"no generated-store shape with {runs} runs; available: {sorted(SHAPES)} "
                         "(or pass a StoreShape)")
    return SHAPES[runs]


def grid_dict(shape: StoreShape, name: str) -> dict[str, Any]:
    """The grid file (as a mapping) whose trials the store holds."""
    return {
        "name": name,
        "description": f"generated store for etbench bench report: {shape.runs} runs",
        "base": {"task": {"kind": "image", "dataset": "digits"},
                 "train": {"epochs": shape.epochs, "batch_size": 64, "eval_trace_samples": shape.trace_samples}},
        "models": ["et", "vit"],
        "axes": {"model.et.steps": list(shape.steps),
                 **({"model.et.memories": list(shape.memories)} if shape.memories else {}),
                 "train.lr": list(shape.lrs)},
        "seeds": list(shape.seeds),
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }


class RecordingClient:
    """Stands in for ``MlflowClient`` under a RunTracker: records what the tracker would send to MLflow."""

    def __init__(self, experiment_tags: dict[str, str] | None = None) -> None:
        self.tags: dict[str, str] = {}
        self.params: list[Any] = []
        self.metrics: list[Any] = []
        self.experiment_tags = experiment_tags if experiment_tags is not None else {}

    def get_experiment(self, experiment_id: str) -> Any:
        return SimpleNamespace(experiment_id=experiment_id, tags=dict(self.experiment_tags))

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.experiment_tags[key] = value

    def create_run(self, experiment_id: str, tags: dict[str, str] | None = None, run_name: str | None = None,
                   **_: Any) -> Any:
        self.tags = dict(tags or {})
        return SimpleNamespace(info=SimpleNamespace(run_id="recorded"))

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (), **_: Any) -> None:
        self.metrics += list(metrics)
        self.params += list(params)
        self.tags.update({t.key: t.value for t in tags})

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.tags[key] = value

    def set_terminated(self, run_id: str, status: str = "FINISHED", **_: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the store generator's recording client has no {name!r}: RunTracker calls an "
                             "MlflowClient method the generator does not reproduce yet; add it here")


def _tracker(client: RecordingClient, run_name: str) -> RunTracker:
    tracker = RunTracker.__new__(RunTracker)  # no MLflow connection: every call goes to the recording client
    tracker.client, tracker.uri, tracker.experiment_id = client, "recording", "0"
    tracker.run_name, tracker.run_id = run_name, None
    return tracker


def _noise(*key: object) -> random.Random:
    return random.Random(zlib.crc32(repr(key).encode()))


def _outcome(trial: Trial, shape: StoreShape) -> dict[str, Any]:
    """Synthetic epoch rows, summary and energy trace of one trial (deterministic in its config hash)."""
    cfg = trial.config
    rng = _noise(trial.config_hash)
    steps = int(cfg.model.et.steps)
    lr = float(cfg.train.lr)
    et = cfg.model.name == "et"
    mem = cfg.model.et.num_memories if et else 0
    quality = (0.16 if et else 0.19) * (0.6 + 0.4 / math.sqrt(steps)) * (1 + 0.3 * math.log10(lr / 1e-3) ** 2)
    final = quality * (1 + (6.0 / mem if et else 0.0)) * (1 + 0.04 * rng.gauss(0, 1))
    rows = []
    for e in range(1, shape.epochs + 1):
        mse = final * (1 + 2.5 * math.exp(-1.2 * (e - 1)))
        row = {"epoch": float(e), "train/loss": mse * 1.1, "lr": lr * (1 - (e - 1) / shape.epochs),
               "time/epoch_s": 2.0 + 0.2 * steps + rng.random()}
        for split, bump in (("val", 1.0), ("test", 0.98)):
            m = mse * bump * (1 + 0.01 * rng.gauss(0, 1))
            row.update({f"{split}/loss": m * 1.05, f"{split}/mse_chosen": m * 1.05, f"{split}/mse_masked": m,
                        f"{split}/psnr": 10 * math.log10(1 / m)})
        rows.append(row)
    best_i = min(range(len(rows)), key=lambda i: rows[i]["val/mse_masked"])
    dim = cfg.model.et.dim
    params = (4 * dim * dim + dim * mem + 2000.0) if et else (12 * dim * dim * steps + 2000.0)
    flops = 2 * 16 * params * (steps if et else 1) * 3
    wall = sum(r["time/epoch_s"] for r in rows) + 1.0
    summary: dict[str, Any] = {
        "config_hash": trial.config_hash, "paper_comparable": cfg.paper_comparable, "best_epoch": best_i + 1,
        "best": {k: rows[best_i][k] for k in EPOCH_KEYS if k != "lr"},
        "final": rows[-1],
        "cost": _cost(params, flops, wall, shape),
        "data": {"dataset": cfg.task.dataset, "checksum": "generated-store", "image_shape": [1, 8, 8],
                 "train": 1437, "val": 179, "test": 181},
        "artifacts": ["reconstruction.png", "memories.png"] if et else ["reconstruction.png"],
    }
    trace = None
    if et:
        t = np.arange(steps + 1, dtype=float)
        trace = []
        for s in range(shape.trace_samples):
            off = rng.gauss(0, 3)
            e_att = -770.0 - 6.0 * (1 - np.exp(-t / 1.5)) * (1 + mem / 256) + off
            e_hn = -58.0 - 30.0 * (1 - np.exp(-t / 1.2)) - 0.02 * mem + off / 3
            dx = np.append(0.6 * np.exp(-t[:-1] / 3) * (1 + 0.05 * rng.gauss(0, 1)), np.nan)
            grad = 2.0 * np.exp(-t / 2.5) + 0.05 + 0.01 * abs(off)
            rel = dx / 12.0  # ‖x‖ ≈ 12: a token's norm at D = 64 after the energy LayerNorm's scale
            fixed = _first_below(rel[:-1], S.FIXED_POINT_TOL)
            trace += [{"step": int(i), "sample": s, "E": float(e_att[i] + e_hn[i]), "E_att": float(e_att[i]),
                       "E_hn": float(e_hn[i]), "dx_norm": float(dx[i]), "rose": False,
                       "grad_norm_mean": float(grad[i]), "grad_norm_max": float(1.8 * grad[i]),
                       "rel_update": float(rel[i]), "fixed_point_step": "" if fixed is None else fixed}
                      for i in range(steps + 1)]
        curves = ("E", "E_att", "E_hn", "dx_norm", "grad_norm_mean", "grad_norm_max", "rel_update")
        means = {k: [float(np.nanmean([r[k] for r in trace if r["step"] == i]))
                     if not all(math.isnan(r[k]) for r in trace if r["step"] == i) else float("nan")
                     for i in range(steps + 1)] for k in curves}
        for k in ("dx_norm", "rel_update"):  # T updates, as the real trace's means (T + 1 energies)
            means[k] = means[k][:-1]
        summary["energy"] = {"rise_fraction": 0.0, **means,
                             "fixed_point_step": _first_below(np.array(means["rel_update"]), S.FIXED_POINT_TOL)}
    return {"rows": rows, "summary": summary, "trace": trace}


def _first_below(values: np.ndarray, tol: float) -> int | None:
    """The first update whose relative update is below ``tol`` (the trace's fixed-point step), None when never."""
    hits = np.flatnonzero(values < tol)
    return int(hits[0]) if hits.size else None


def _cost(params: float, flops: float, wall: float, shape: StoreShape) -> dict[str, float]:
    """A value for every cost metric of the schema (S.COST_METRICS), so new cost columns appear here too."""
    known = {"params": params, "flops_per_sample": flops, "wall_s": wall, "throughput": 64 * shape.epochs / wall,
             "peak_mem_mb": 40.0 + params / 1e4, "process_peak_rss_mb": 900.0 + params / 1e4,
             "samples_seen": 64.0 * shape.epochs, "train_s": wall - 1.0}
    return {k: known.get(k, 1.0) for k in (m.removeprefix("cost/") for m in S.COST_METRICS)}


def _png(seed: int) -> bytes:
    """A small valid PNG (an 8×8 grey pattern), written once and shared by every run's image artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, np.random.default_rng(seed).random((8, 8)), cmap="gray", format="png")
    return buf.getvalue()


def _write_artifacts(folder: Path, trial: Trial, out: dict[str, Any], pngs: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = trial.config
    (folder / "config.json").write_text(json.dumps({"config_hash": trial.config_hash,
                                                    "paper_comparable": cfg.paper_comparable,
                                                    "config": cfg.model_dump(mode="json")}, indent=2))
    with (folder / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", *EPOCH_KEYS])
        w.writeheader()
        w.writerows(out["rows"])
    (folder / "summary.json").write_text(json.dumps(out["summary"], indent=2, default=float))
    if out["trace"] is not None:
        with (folder / S.ENERGY_TRACE_ARTIFACT).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*S.ENERGY_TRACE_COLUMNS, *S.ENERGY_TRACE_DIAGNOSTICS])
            w.writeheader()
            w.writerows(out["trace"])
    for name in out["summary"]["artifacts"]:
        (folder / name).write_bytes(pngs[name])


def _local_dir(artifact_uri: str) -> Path:
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(unquote(urlparse(artifact_uri).path)))


def _latest(points: list[tuple[str, float, int, int, bool]]) -> dict[str, tuple[float, int, int, bool]]:
    """MLflow's latest_metrics rule: per key the point of the largest (step, timestamp, value)."""
    best: dict[str, tuple[float, int, int, bool]] = {}
    for key, value, ts, step, is_nan in points:
        cur = best.get(key)
        if cur is None or (step, ts, value) > (cur[2], cur[1], cur[0]):
            best[key] = (value, ts, step, is_nan)
    return best


def _run_rows(trial: Trial, template: dict[str, str], shape: StoreShape, run_id: str, start_ms: int,
              exp_id: int, artifact_uri: str, experiment_tags: dict[str, str]) -> tuple[Any, ...]:
    """The SQL rows (runs, tags, params, metrics, latest_metrics) of one trial and its synthetic outcome; what the
    tracker sets on the experiment (its runs-table view) accumulates in ``experiment_tags``."""
    out = _outcome(trial, shape)
    rec = RecordingClient(experiment_tags)
    tracker = _tracker(rec, trial.run_name)
    tracker.run_id = run_id
    tracker.log_params(trial.config.flat())
    epoch_ms = []
    clock = start_ms
    for i, row in enumerate(out["rows"]):
        before = len(rec.metrics)
        tracker.log_epoch(i, row)
        clock += int(row["time/epoch_s"] * 1000)
        epoch_ms += [clock] * (len(rec.metrics) - before)
    tracker.log_summary(out["summary"])
    end_ms = clock + 1000
    epoch_ms += [end_ms] * (len(rec.metrics) - len(epoch_ms))
    tags = {k: v for k, v in template.items() if not k.startswith(S.TAG_AXIS_PREFIX)}
    cfg = trial.config
    tags.update({S.TAG_CONFIG_HASH: trial.config_hash, S.TAG_MODEL: cfg.model.name, S.TAG_SEED: str(cfg.train.seed),
                 "mlflow.runName": trial.run_name})
    tags.update({S.TAG_AXIS_PREFIX + axis_tag_name(k): str(v) for k, v in trial.axes.items()})
    points = [(m.key, float(m.value), ts, int(m.step), math.isnan(m.value)) for m, ts in zip(rec.metrics, epoch_ms,
                                                                                            strict=True)]
    run = {"run_uuid": run_id, "name": trial.run_name, "source_type": "UNKNOWN", "source_name": "",
           "entry_point_name": "", "user_id": "unknown", "status": "FINISHED", "start_time": start_ms,
           "end_time": end_ms, "source_version": "", "lifecycle_stage": "active", "artifact_uri": artifact_uri,
           "experiment_id": exp_id}
    tag_rows = [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()]
    param_rows = [{"key": p.key, "value": p.value, "run_uuid": run_id} for p in rec.params]
    metric_rows = [{"key": k, "value": 0.0 if nan else v, "timestamp": ts, "step": st, "is_nan": nan,
                    "run_uuid": run_id} for k, v, ts, st, nan in points]
    latest_rows = [{"key": k, "value": 0.0 if nan else v, "timestamp": ts, "step": st, "is_nan": nan,
                    "run_uuid": run_id} for k, (v, ts, st, nan) in _latest(points).items()]
    return run, tag_rows, param_rows, metric_rows, latest_rows, out


#: The provenance tags a one-worker run gets where it trains (:func:`etbench.engine.provenance.in_process_tags`).
PROVENANCE_TAGS = (S.TAG_CODE_HASH, S.TAG_DEVICE_NAME, S.TAG_HOSTNAME, S.TAG_NODE_IP, S.TAG_PRECISION)


def _templates(trials: list[Trial], grid: str) -> dict[str, dict[str, str]]:
    """The tags RunTracker.start writes, once per model (git commit, versions, ... as a real run has them)."""
    out: dict[str, dict[str, str]] = {}
    for t in trials:
        if t.model in out:
            continue
        rec = RecordingClient()
        tracker = _tracker(rec, t.run_name)
        tracker.start(t.config, grid=grid, axes=t.axes, data={"checksum": "generated-store"})
        rec.tags.setdefault(S.TAG_DATASET_CHECKSUM, "generated-store")  # run_tracked sets it after the run
        for key in PROVENANCE_TAGS:  # what run_tracked tags the run with where it trains (etbench.engine.provenance)
            rec.tags.setdefault(key, "generated-store")
        out[t.model] = rec.tags
    return out


def generate_store(dest: Path, shape: StoreShape | int, *, name: str | None = None, batch: int = 250,
                   progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the store under ``dest`` (mlflow.db, artifacts/, grid.yaml, store.json); reuse a complete one
    (``reused`` in the returned info says which).

    An interrupted generation leaves no store.json; the next call starts that store afresh.
    """
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    from mlflow.tracking import MlflowClient
    from sqlalchemy import create_engine, event, insert

    shape = shape_for(shape) if isinstance(shape, int) else shape
    dest = Path(dest).resolve()
    name = name or f"bench-report-{shape.runs}"
    done = dest / COMPLETE
    if done.exists():
        info = json.loads(done.read_text())
        if info.get("runs") == shape.runs and info.get("experiment") == name:
            progress(f"[store] reusing {dest} ({shape.runs} runs)")
            return {**info, "reused": True}
    if dest.exists():
        progress(f"[store] {dest} is incomplete or of another size: starting it afresh")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    grid = grid_dict(shape, name)
    (dest / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    trials = expand(GridSpec.model_validate(grid), source=str(dest / "grid.yaml"))
    t_expand = time.perf_counter() - t0
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)  # creates MLflow's tables (its own migrations)
    exp_id = int(ensure_experiment(client, name, dest / "artifacts"))  # as a real run creates it (tags, location)
    location = client.get_experiment(str(exp_id)).artifact_location
    experiment_tags = dict(client.get_experiment(str(exp_id)).tags)
    templates = _templates(trials, name)
    pngs = {"reconstruction.png": _png(0), "memories.png": _png(1)}
    engine = create_engine(uri)
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    tables = [SqlRun.__table__, SqlTag.__table__, SqlParam.__table__, SqlMetric.__table__, SqlLatestMetric.__table__]
    ids = random.Random(shape.runs)
    start_ms = T0_MS
    for lo in range(0, len(trials), batch):
        chunk: list[list[dict[str, Any]]] = [[] for _ in tables]
        for trial in trials[lo:lo + batch]:
            run_id = uuid.UUID(int=ids.getrandbits(128), version=4).hex
            artifact_uri = f"{location}/{run_id}/artifacts"
            run, *rows, out = _run_rows(trial, templates[trial.model], shape, run_id, start_ms, exp_id, artifact_uri,
                                        experiment_tags)
            chunk[0].append(run)
            for acc, part in zip(chunk[1:], rows, strict=True):
                acc += part
            _write_artifacts(_local_dir(artifact_uri), trial, out, pngs)
            start_ms = run["end_time"] + 500
        with engine.begin() as conn:
            for table, rows_ in zip(tables, chunk, strict=True):
                conn.execute(insert(table), rows_)
        progress(f"[store] {min(lo + batch, len(trials))}/{len(trials)} runs written "
                 f"({time.perf_counter() - t0:.0f} s)")
    engine.dispose()
    for key, value in experiment_tags.items():
        client.set_experiment_tag(str(exp_id), key, value)
    info = {"runs": len(trials), "experiment": name, "tracking_uri": uri, "grid": str(dest / "grid.yaml"),
            "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.__dict__.items()},
            "generate_s": round(time.perf_counter() - t0, 2), "expand_s": round(t_expand, 2)}
    done.write_text(json.dumps(info, indent=2))
    progress(f"[store] {len(trials)} runs in {info['generate_s']} s → {dest}")
    return {**info, "reused": False}
