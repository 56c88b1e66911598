"""Test-time dynamics of a finished run (``etbench dynamics``): its trained model re-evaluated on the run's test
split at other step counts T' and step sizes α' = scale·α — does the descent converge, and does the task metric
follow the energy?

One row per (T', scale): the run's test metrics under their usual names (``test/mse_masked``, ``test/auroc``, …)
and, over the test split's descents, the mean final energy ``energy`` = E(x_T'), the mean over tokens of
``grad_norm`` = ‖∂E/∂g‖ at g = LN(x_T'), ``delta_norm`` = ‖x_T' − x_{T'−1}‖ of the last update, ``rose_fraction``
(share of (sample, update) pairs where E rose) and ``fixed_point_step`` (first update whose mean relative update
‖Δx‖/‖x‖ is below the tolerance; empty when none is). Image metrics and descents are per image; the graph ET's
descent runs on the whole graph (one sample). ``vit-tied`` has no energy: T' counts applications of its tied
block, only scale 1 is allowed, and its energy columns are empty.

The checkpoint is the run's last epoch, so T' = the training T reproduces the last row of metrics.json exactly.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from etbench.config import RunConfig
from etbench.engine.backend import eval_mode
from etbench.engine.build import build_model, build_task, resolve_device
from etbench.engine.loop import checkpoint_dir
from etbench.errors import EtbenchError
from etbench.models.energy import FIXED_POINT_TOL, EnergyTrace, first_below
from etbench.tracking.schema import DYNAMICS_ARTIFACT

PROBED = (("image", "et"), ("graph", "et"), ("image", "vit-tied"))  # (task kind, model name) pairs probed


class DynamicsError(EtbenchError, ValueError):
    """The run cannot be probed as asked (not a probed model, missing files, a scale vit-tied cannot take)."""


@dataclass
class LoadedRun:
    """A finished run rebuilt from its folder: config, task (data and split), model with the checkpoint's weights,
    and the metrics the run recorded at the checkpoint's epoch."""

    folder: Path
    cfg: RunConfig
    task: Any
    model: nn.Module
    recorded: dict[str, float]


def load_run(folder: Path, device: str = "auto", test_limit: int | None = None) -> LoadedRun:
    """Rebuild the run in ``folder`` (config.json, metrics.json, checkpoints/latest/state.pt). ``test_limit``
    (image tasks) keeps the first that many test images, each under its usual mask: a cheaper probe whose metrics
    are then those of the subset, not the recorded ones."""
    folder = Path(folder)
    for need in ("config.json", "metrics.json"):
        if not (folder / need).is_file():
            raise DynamicsError(f"{folder} is not a finished run folder: {need} is missing")
    cfg = RunConfig.model_validate(json.loads((folder / "config.json").read_text())["config"])
    key = (cfg.task.kind, cfg.model.name)
    if key not in PROBED:
        raise DynamicsError(f"etbench dynamics probes the image ET, the graph ET and vit-tied; run {folder} is the "
                            f"{cfg.task.kind} model {cfg.model.name!r}, whose forward pass has no step count to vary")
    state_file = checkpoint_dir(folder) / "state.pt"
    if not state_file.is_file():
        raise DynamicsError(f"{folder}: no single-process checkpoint {state_file} (runs trained under DeepSpeed keep "
                            f"theirs in DeepSpeed's format; rerun with one worker to probe)")
    history = json.loads((folder / "metrics.json").read_text())
    if len(history) < cfg.train.epochs:
        raise DynamicsError(f"{folder}: the run stopped after {len(history)} of {cfg.train.epochs} epochs; "
                            f"resume it first (etbench train … --resume)")
    dev = resolve_device(device if device != "auto" else cfg.train.device, False)
    task = build_task(cfg, dev)
    if test_limit is not None:
        if test_limit < 1 or not hasattr(task, "splits"):
            raise DynamicsError(f"--test-limit must be ≥ 1 and applies to image runs only; got {test_limit} for "
                                f"the {cfg.task.kind} run {folder}")
        test = task.splits.test  # the first images keep their indices, hence their fixed evaluation masks
        task.splits = replace(task.splits, test=Subset(test, range(min(test_limit, len(test)))))
    model = build_model(cfg, task.describe()).to(dev)
    state = torch.load(state_file, map_location=dev, weights_only=True)
    model.load_state_dict(state["model"])
    return LoadedRun(folder, cfg, task, model, dict(history[-1]))


def split_metrics(task: Any, model: nn.Module) -> dict[str, float]:
    """The task's ``test/*`` metrics (image: the test split alone; graph: val fixes the threshold, as in training)."""
    def same(t: Tensor) -> Tensor:
        return t

    with eval_mode(model), torch.no_grad():
        if hasattr(task, "evaluate_split"):
            return task.evaluate_split(model, "test", same)
        return {k: v for k, v in task.evaluate(model, same).items() if k.startswith("test/")}


class _Steps:
    """Per-update norms of the tied block (‖x_{t+1} − x_t‖ and ‖x_t‖ per sample), gathered by a forward hook."""

    def __init__(self) -> None:
        self.delta: list[list[Tensor]] = []  # one list of (batch,) tensors per forward pass
        self.size: list[list[Tensor]] = []

    def hook(self, _module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach()
        self.delta[-1].append((output.detach() - x).flatten(1).norm(dim=-1).double().cpu())
        self.size[-1].append(x.flatten(1).norm(dim=-1).double().cpu())

    def start(self, *_: object) -> None:
        self.delta.append([])
        self.size.append([])


@contextmanager
def _tied_depth(model: nn.Module, steps: int) -> Iterator[_Steps]:
    """``vit-tied`` applying its block ``steps`` times, its per-application norms recorded."""
    rec, saved = _Steps(), model.arch
    model.arch = saved.model_copy(update={"depth": steps})
    hooks = [model.blocks[0].register_forward_hook(rec.hook), model.register_forward_pre_hook(rec.start)]
    try:
        yield rec
    finally:
        model.arch = saved
        for h in hooks:
            h.remove()


def _merge(traces: list[EnergyTrace]) -> EnergyTrace:
    """The traces of several descents (batches, or one graph) as one trace over all their samples."""
    def cat(name: str) -> Tensor:  # (samples, steps) per trace; a graph's trace is one sample
        return torch.cat([getattr(t, name).reshape(math.prod(t.E.shape[:-1]), -1) for t in traces])

    return EnergyTrace(cat("E"), cat("E_att"), cat("E_hn"), cat("dx_norm"), traces[0].eps,
                       grad_norm_mean=cat("grad_norm_mean"), grad_norm_max=cat("grad_norm_max"),
                       rel_update=cat("rel_update"))


def _fixed_point(rel: Tensor, tol: float) -> int | str:
    """First update of the mean relative-update curve below ``tol``; "" when none (or no update) is."""
    if rel.shape[-1] == 0:
        return ""
    t = int(first_below(rel.mean(0), tol))
    return t if t >= 0 else ""


def _curve(steps: int, energy: Tensor | None = None, grad: Tensor | None = None, rel: Tensor | None = None,
           rose: Tensor | None = None) -> list[dict[str, float | int]]:
    """Per-step means over the test samples of (samples, T'+1) energy / gradient-norm and (samples, T') relative
    update / rise curves; one row per step t = 0 … T' (update columns NaN at t = 0, missing curves NaN)."""
    def at(v: Tensor | None, t: int) -> float:
        return math.nan if v is None or not 0 <= t < v.shape[-1] else float(v[:, t].double().mean())

    return [{"step": t, "energy": at(energy, t), "grad_norm": at(grad, t), "rel_update": at(rel, t - 1),
             "rose_fraction": at(rose, t - 1)} for t in range(steps + 1)]


def _et_row(run: LoadedRun, steps: int, scale: float, tol: float, curve: list[dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    core = getattr(run.model, "module", run.model)
    traces: list[EnergyTrace] = []
    with core.et.probing(steps=steps, alpha=scale * core.et.cfg.alpha, on_trace=traces.append):
        metrics = split_metrics(run.task, run.model)
    return _et_values(metrics, _merge(traces), steps, tol, curve)


def _et_values(metrics: dict[str, float], tr: EnergyTrace, steps: int, tol: float,
               curve: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One probe row of the ET from its test metrics and the merged trace of its test descents (of ``steps``)."""
    assert tr.grad_norm_mean is not None and tr.rel_update is not None
    if curve is not None:
        curve += _curve(steps, tr.E, tr.grad_norm_mean, tr.rel_update, tr.rose())
    return {**metrics, "energy": float(tr.E[:, -1].mean()), "grad_norm": float(tr.grad_norm_mean[:, -1].mean()),
            "delta_norm": float(tr.dx_norm[:, -1].mean()) if steps else math.nan,
            "rose_fraction": tr.rise_fraction() if steps else math.nan,
            "fixed_point_step": _fixed_point(tr.rel_update, tol)}


def _tied_row(run: LoadedRun, steps: int, tol: float, curve: list[dict[str, Any]] | None = None,
              ) -> dict[str, Any]:
    with _tied_depth(run.model, steps) as rec:
        metrics = split_metrics(run.task, run.model)
    out: dict[str, Any] = {**metrics, "energy": math.nan, "grad_norm": math.nan, "delta_norm": math.nan,
                           "rose_fraction": math.nan, "fixed_point_step": ""}
    if steps:  # (samples, T') per-application norms over every test batch
        delta = torch.cat([torch.stack(d, -1) for d in rec.delta])
        size = torch.cat([torch.stack(s, -1) for s in rec.size])
        out.update(delta_norm=float(delta[:, -1].mean()), fixed_point_step=_fixed_point(delta / size, tol))
        if curve is not None:
            curve += _curve(steps, rel=delta / size)
    elif curve is not None:
        curve += _curve(0)
    return out


def check_request(run: LoadedRun, steps: Sequence[int], scales: Sequence[float]) -> None:
    """Refuse step counts < 0, scales ≤ 0, no step or scale, and a scale ≠ 1 for vit-tied (one error line)."""
    if not steps or not scales:
        raise DynamicsError("give at least one step count (--steps) and one step-size scale (--alpha-scale)")
    if bad := [t for t in steps if t < 0]:
        raise DynamicsError(f"--steps must be ≥ 0, got {bad}")
    if bad_s := [s for s in scales if not s > 0]:
        raise DynamicsError(f"--alpha-scale must be > 0, got {bad_s}")
    if run.cfg.model.name == "vit-tied" and any(s != 1 for s in scales):
        raise DynamicsError(f"vit-tied has no step size α (its update is a transformer block), so only "
                            f"--alpha-scale 1 is allowed; got {list(scales)}")


def probe(run: LoadedRun, steps: Sequence[int], scales: Sequence[float], tol: float = FIXED_POINT_TOL,
          curves: list[dict[str, Any]] | None = None, curve_steps: int | None = None) -> list[dict[str, Any]]:
    """One row per (T', scale), in the order given: eval_steps, alpha_scale, test metrics, dynamics columns.

    With ``curves`` (a list to extend) and ``curve_steps``, the descent at T' = ``curve_steps`` also adds its
    per-step curve: rows eval_steps, alpha_scale, step t, then the test-sample means of E(x_t), ‖∂E/∂g‖ at x_t,
    the relative update ‖Δx‖/‖x‖ and the share of samples whose E rose in update t (vit-tied: relative update
    only)."""
    check_request(run, steps, scales)
    tied = run.cfg.model.name == "vit-tied"
    rows = []
    for t in steps:
        for s in scales:
            curve: list[dict[str, Any]] | None = [] if curves is not None and t == curve_steps else None
            row = _tied_row(run, t, tol, curve) if tied else _et_row(run, t, s, tol, curve)
            rows.append({"eval_steps": t, "alpha_scale": s, **row})
            if curves is not None and curve is not None:
                curves += [{"eval_steps": t, "alpha_scale": s, **c} for c in curve]
    return rows


def write_csv(rows: list[dict[str, Any]], out: Path) -> Path:
    """``out/dynamics.csv`` (columns in row order; NaN written as empty)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / DYNAMICS_ARTIFACT
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows])
    return path


def run_folder_from_mlflow(tracking_uri: str, run_id: str, results: Path | None = None) -> Path:
    """The folder of an MLflow run, ``<results>/<grid>/trials/<config hash>`` (results: given, else beside a SQLite
    store's database file); the run's tags name the grid and hash."""
    from mlflow.tracking import MlflowClient

    from etbench.tracking.schema import TAG_CONFIG_HASH, TAG_GRID

    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    if TAG_CONFIG_HASH not in tags or TAG_GRID not in tags:
        raise DynamicsError(f"MLflow run {run_id} is not an etbench run (no {TAG_CONFIG_HASH} / {TAG_GRID} tag)")
    if results is None:
        if not tracking_uri.startswith("sqlite:///"):
            raise DynamicsError(f"cannot tell where run {run_id}'s files are from {tracking_uri}; give --results "
                                f"(the storage folder the grid ran with) or the run's folder")
        results = Path(tracking_uri.removeprefix("sqlite:///")).parent
    folder = Path(results) / tags[TAG_GRID] / "trials" / tags[TAG_CONFIG_HASH]
    if not folder.is_dir():
        raise DynamicsError(f"MLflow run {run_id}: its folder {folder} does not exist here; give --results (the "
                            f"storage folder the grid ran with) or the run's folder")
    return folder


def log_to_mlflow(tracking_uri: str, run_id: str, paths: Sequence[Path]) -> None:
    """Attach the probe's files to the run, under ``dynamics/``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path="dynamics")
