"""The image probe of :mod:`etbench.engine.dynamics` in one descent per step size: every test batch descends once to
the longest T', the tokens are decoded at each requested T' on the way, and each T' is then scored by the task's own
``evaluate_split`` replaying those predictions. Same rows as :func:`etbench.engine.dynamics.probe` (the descent is
Markov in x, so stopping at T' and continuing is the descent of T' steps; its trace is rebuilt exactly), for the
cost of max(T') steps instead of ΣT' — the grid probe's 10 step counts up to 96 cost 96 steps, not 211.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from etbench.engine import dynamics as dyn
from etbench.engine.backend import eval_mode
from etbench.models.energy import FIXED_POINT_TOL, EnergyTrace


class _Replay(nn.Module):
    """A stand-in model that returns recorded predictions, batch by batch, in the order they were made."""

    def __init__(self, preds: list[Tensor]) -> None:
        super().__init__()
        self.preds = iter(preds)

    def forward(self, images: Tensor, replace: Tensor) -> Tensor:
        return next(self.preds)


class _Record(nn.Module):
    """Wraps the trained model: one descent to the longest T' per batch, predictions (and the trace or the block's
    update norms) kept at every requested T'."""

    def __init__(self, model: nn.Module, stops: list[int], alpha: float | None) -> None:
        super().__init__()
        self.core, self.stops, self.alpha = model, stops, alpha
        self.preds: dict[int, list[Tensor]] = {t: [] for t in stops}
        self.segments: list[list[EnergyTrace]] = []  # ET: per batch, the trace of each segment between stops
        self.norms: list[tuple[Tensor, Tensor]] = []  # vit-tied: per batch, (‖Δx‖, ‖x‖) per application

    def forward(self, images: Tensor, replace: Tensor) -> Tensor:
        core, x, prev = self.core, self.core.tokens(images, replace), 0
        segs: list[EnergyTrace] = []
        delta: list[Tensor] = []
        size: list[Tensor] = []
        for t in self.stops:
            if self.alpha is not None:  # the ET: ImageET.process, stopped at t
                x, tr = core.et.descend(x, steps=t - prev, alpha=self.alpha, trace=True)
                segs.append(tr)
                g = core.et.norm(x)
                out = core.et.norm(g) if core.double_norm else g
            else:  # vit-tied: its process with depth t
                for _ in range(t - prev):
                    y = core.blocks[0](x)
                    delta.append((y - x).flatten(1).norm(dim=-1).double().cpu())
                    size.append(x.flatten(1).norm(dim=-1).double().cpu())
                    x = y
                out = core.norm(x)
            self.preds[t].append(core.decoder(out[:, 1:]))
            prev = t
        if self.alpha is not None:
            self.segments.append(segs)
        else:
            n = x.shape[0]
            self.norms.append((torch.stack(delta, -1) if delta else torch.zeros(n, 0, dtype=torch.float64),
                               torch.stack(size, -1) if size else torch.zeros(n, 0, dtype=torch.float64)))
        return self.preds[self.stops[0]][-1]


def _upto(segs: list[EnergyTrace], k: int) -> EnergyTrace:
    """The trace of the descent to the k-th stop: segments 0 … k joined (each earlier segment's end point is the
    next one's start)."""
    parts = segs[: k + 1]

    def cat(name: str, points: bool) -> Tensor:
        vs = [getattr(p, name) for p in parts]
        return torch.cat([v[..., :-1] for v in vs[:-1]] + [vs[-1]], -1) if points else torch.cat(vs, -1)

    return EnergyTrace(cat("E", True), cat("E_att", True), cat("E_hn", True), cat("dx_norm", False), parts[0].eps,
                       grad_norm_mean=cat("grad_norm_mean", True), grad_norm_max=cat("grad_norm_max", True),
                       rel_update=cat("rel_update", False))


def probe_prefix(run: dyn.LoadedRun, steps: Sequence[int], scales: Sequence[float], tol: float = FIXED_POINT_TOL,
                 curves: list[dict[str, Any]] | None = None, curve_steps: int | None = None) -> list[dict[str, Any]]:
    """:func:`etbench.engine.dynamics.probe` for an image ET or vit-tied run, one descent per scale (same rows)."""
    if run.cfg.task.kind != "image":
        return dyn.probe(run, steps, scales, tol, curves, curve_steps)
    dyn.check_request(run, steps, scales)
    tied = run.cfg.model.name == "vit-tied"
    core = getattr(run.model, "module", run.model)
    stops = sorted(set(steps))

    def same(v: Tensor) -> Tensor:
        return v

    rows: dict[tuple[int, float], dict[str, Any]] = {}
    for s in scales:
        rec = _Record(core, stops, None if tied else s * core.et.cfg.alpha)
        with eval_mode(rec), torch.no_grad():
            run.task.evaluate_split(rec, "test", same)
            for k, t in enumerate(stops):
                metrics = run.task.evaluate_split(_Replay(rec.preds[t]), "test", same)
                curve: list[dict[str, Any]] | None = [] if curves is not None and t == curve_steps else None
                if tied:
                    row = _tied(metrics, rec.norms, t, tol, curve)
                else:
                    tr = dyn._merge([_upto(segs, k) for segs in rec.segments])
                    row = dyn._et_values(metrics, tr, t, tol, curve)
                rows[(t, s)] = {"eval_steps": t, "alpha_scale": s, **row}
                if curves is not None and curve is not None:
                    curves += [{"eval_steps": t, "alpha_scale": s, **c} for c in curve]
    return [rows[(t, s)] for t in steps for s in scales]


def _tied(metrics: dict[str, float], norms: list[tuple[Tensor, Tensor]], t: int, tol: float,
          curve: list[dict[str, Any]] | None) -> dict[str, Any]:
    out: dict[str, Any] = {**metrics, "energy": math.nan, "grad_norm": math.nan, "delta_norm": math.nan,
                           "rose_fraction": math.nan, "fixed_point_step": ""}
    if t:
        delta = torch.cat([d[:, :t] for d, _ in norms])
        size = torch.cat([z[:, :t] for _, z in norms])
        out.update(delta_norm=float(delta[:, -1].mean()), fixed_point_step=dyn._fixed_point(delta / size, tol))
        if curve is not None:
            curve += dyn._curve(t, rel=delta / size)
    elif curve is not None:
        curve += dyn._curve(0)
    return out
