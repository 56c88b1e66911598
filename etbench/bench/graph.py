"""`etbench bench graph`: full-graph training epoch time and peak memory of the graph ET (at its default T and at each
extra T) vs GCN and BWGNN on Tolokers, timed side by side in one process, with the epoch-time ratios and their targets
(issue 24: ET ≤ 3× GCN at the default T = 1, ≤ 4× at T = 4); and the graph ET's peak memory as the edge count grows
(it must grow linearly in E, never as N²). The load average before and after is recorded: on a shared machine the
ratios are the comparable numbers, not the seconds. JSON out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etbench.bench.common import machine_info, peak_memory_mb, summary, timed, write_json
from etbench.models.graph import GAD_ET_DEFAULTS

MODELS = ("et", "gcn", "bwgnn")
STEP_TARGETS = {1: 3.0, 4: 4.0}  # epoch-time ratio ET / GCN allowed at T steps (issue 24)


def _graph_inputs(dataset: str, path: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from etbench.data.graphs import load_graph_dataset
    from etbench.data.paths import resolve_data_path

    g = load_graph_dataset(dataset, resolve_data_path(path))
    x = g.x.float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, g.edge_index, g.y.clamp_min(0)


def make_epoch(name: str, dataset: str, path: str | None, device: str, et_steps: int | None = None
               ) -> Callable[[], float]:
    """One full-graph training epoch (forward, class-weighted CE on all labelled nodes, backward, Adam); the model at
    its defaults (``et_steps`` overrides the graph ET's T)."""
    from etbench.models import registry

    x, ei, y = _graph_inputs(dataset, path)
    torch.manual_seed(0)
    kw = {"et": {"steps": et_steps}} if et_steps is not None else {}
    model = registry.build("graph", name, in_dim=x.shape[1], **kw).to(device).train()
    x, ei, y = x.to(device), ei.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = torch.tensor([1.0, float((y == 0).sum()) / max(1, int((y == 1).sum()))], device=device)

    def epoch() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x, ei), y, weight=w)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return epoch


def make_random_graph_epoch(num_nodes: int, num_edges: int, device: str) -> Callable[[], float]:
    """One graph-ET epoch on a random graph with ``num_edges`` directed edges (memory-scaling probe)."""
    from etbench.models import registry

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_nodes, 16, generator=gen)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=gen)
    ei = ei[:, ei[0] != ei[1]]
    y = (torch.rand(num_nodes, generator=gen) < 0.05).long()
    model = registry.build("graph", "et", in_dim=16).to(device).train()
    x, ei, y = x.to(device), ei.to(device), y.to(device)

    def epoch() -> float:
        loss = torch.nn.functional.cross_entropy(model(x, ei), y)
        loss.backward()
        return float(loss.detach())

    return epoch


def run_graph_bench(out: Path, *, dataset: str = "tolokers", path: str | None = None, repeats: int = 3,
                    device: str = "cpu", scaling_nodes: int = 20_000,
                    scaling_edges: tuple[int, ...] = (50_000, 100_000, 200_000, 400_000),
                    extra_et_steps: tuple[int, ...] = (4,)) -> dict[str, Any]:
    """Epoch time (interleaved repeats) and peak memory per model (the graph ET at its default T and at each of
    ``extra_et_steps``, as ``et_T<steps>``); ET memory vs E at fixed N; JSON out."""
    load_before = os.getloadavg()
    variants: dict[str, tuple[str, int | None]] = {m: (m, None) for m in MODELS}
    variants.update({f"et_T{t}": ("et", t) for t in extra_et_steps})
    names = list(variants)
    epochs = {k: make_epoch(m, dataset, path, device, t) for k, (m, t) in variants.items()}
    for k in names:
        epochs[k]()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(timed(epochs[k], device))
    load_after = os.getloadavg()
    results = {k: {**summary(times[k]),
                   "peak_mem_mb": peak_memory_mb(make_epoch, (m, dataset, path, device, t), device)}
               for k, (m, t) in variants.items()}
    scaling = [{"edges": e, "peak_mem_mb": peak_memory_mb(make_random_graph_epoch, (scaling_nodes, e, device),
                                                          device)} for e in scaling_edges]
    es = np.array([s["edges"] for s in scaling], dtype=float)
    ms = np.array([s["peak_mem_mb"] for s in scaling], dtype=float)
    slope, intercept = np.polyfit(es, ms, 1)
    resid = ms - (slope * es + intercept)
    dense_mb = scaling_nodes**2 * 4 * 4 / 2**20  # what one dense (H=4, N, N) fp32 score tensor would need
    ratio = results["et"]["median_s"] / results["gcn"]["median_s"]
    default_steps = int(GAD_ET_DEFAULTS["steps"])
    by_steps = {default_steps: ratio, **{t: results[f"et_T{t}"]["median_s"] / results["gcn"]["median_s"]
                                        for t in extra_et_steps}}
    report = {
        "benchmark": "graph",
        "dataset": dataset,
        "machine": machine_info(device),
        "load_average_1_5_15": {"before": load_before, "after_timing": load_after},
        "repeats": repeats,
        "results": results,
        "et_defaults": GAD_ET_DEFAULTS,
        "ratios": {"et_epoch_over_gcn": ratio,
                   "et_epoch_over_bwgnn": results["et"]["median_s"] / results["bwgnn"]["median_s"],
                   **{f"et_T{t}_epoch_over_gcn": r for t, r in sorted(by_steps.items())}},
        "memory_scaling": {"nodes": scaling_nodes, "points": scaling, "mb_per_million_edges": slope * 1e6,
                           "linear_fit_max_residual_mb": float(np.abs(resid).max()),
                           "dense_scores_would_need_mb": dense_mb},
        "targets": {"et_epoch_within_3x_gcn": ratio <= 3.0,
                    **{f"et_T{t}_epoch_within_{STEP_TARGETS[t]:g}x_gcn": by_steps[t] <= STEP_TARGETS[t]
                       for t in sorted(by_steps) if t in STEP_TARGETS},
                    "memory_linear_in_E": bool(np.abs(resid).max() <= 0.1 * ms.max() and ms.max() < dense_mb)},
    }
    write_json(report, out, "bench_graph")
    return report
