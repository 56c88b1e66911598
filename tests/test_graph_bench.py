"""`etbench bench graph` on a tiny stand-in graph: the ET at T = 1 and T = 4 and GCN timed in one run, their ratios
and the issue-24 targets computed from the recorded medians, the load average recorded; JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from etbench.bench import graph as bench


def test_bench_reports_both_step_counts_against_gcn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 60
    x = torch.randn(n, 5, generator=gen)
    ei = torch.randint(0, n, (2, 300), generator=gen)
    ei = torch.cat([ei, ei.flip(0)], 1)
    y = (torch.rand(n, generator=gen) < 0.2).long()
    monkeypatch.setattr(bench, "_graph_inputs", lambda dataset, path: (x, ei, y))
    monkeypatch.setattr(bench, "peak_memory_mb", lambda make, args, device: 1.0 + (args[1] if len(args) == 3 else 0)
                        * 1e-4)
    rep = bench.run_graph_bench(tmp_path, repeats=2, scaling_edges=(100, 200, 400))
    saved = json.loads((tmp_path / "bench_graph.json").read_text())
    assert saved["ratios"] == pytest.approx(rep["ratios"])
    res, ratios = rep["results"], rep["ratios"]
    assert set(res) == {"et", "gcn", "bwgnn", "et_T4"} and all(len(r["times_s"]) == 2 for r in res.values())
    assert ratios["et_T1_epoch_over_gcn"] == pytest.approx(res["et"]["median_s"] / res["gcn"]["median_s"])
    assert ratios["et_T1_epoch_over_gcn"] == ratios["et_epoch_over_gcn"]  # the default T is 1
    assert ratios["et_T4_epoch_over_gcn"] == pytest.approx(res["et_T4"]["median_s"] / res["gcn"]["median_s"])
    targets = rep["targets"]
    assert targets["et_T1_epoch_within_3x_gcn"] == (ratios["et_T1_epoch_over_gcn"] <= 3.0)
    assert targets["et_T4_epoch_within_4x_gcn"] == (ratios["et_T4_epoch_over_gcn"] <= 4.0)
    assert targets["memory_linear_in_E"]
    assert len(rep["load_average_1_5_15"]["before"]) == 3 and rep["repeats"] == 2
