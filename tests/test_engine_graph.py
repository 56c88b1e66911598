"""The graph anomaly-detection task through the same single-run engine (and the graph benchmark, tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etbench.cli import main
from etbench.config import resolve_run_config
from etbench.engine.run import run_single

BASE = {"task": {"kind": "graph", "dataset": "synthetic", "protocol": "bwgnn", "train_ratio": 0.4},
        "train": {"epochs": 4, "lr": 0.01, "warmup_epochs": 0, "checkpoint_every": 2}}


@pytest.mark.parametrize("model", ["et", "gcn", "bwgnn"])
def test_graph_run_records_protocol_metrics(tmp_path: Path, model: str) -> None:
    from etbench.config import deep_merge

    cfg = resolve_run_config(deep_merge(BASE, {"model": {"name": model}}))
    res = run_single(cfg, tmp_path / model, progress=False)
    row = res.state.history[-1]
    for split in ("val", "test"):
        for k in ("auroc", "auprc", "macro_f1", "rec_at_k", "loss"):
            assert 0.0 <= row[f"{split}/{k}"] <= (10.0 if k == "loss" else 1.0), (split, k)
    summary = json.loads((tmp_path / model / "summary.json").read_text())
    assert summary["data"]["split_sizes"]["train"] == round(0.4 * 1000)
    assert summary["data"]["protocol"] == "bwgnn"
    assert summary["cost"]["flops_per_sample"] > 0 and summary["cost"]["params"] > 0
    if model == "et":
        assert summary["energy"]["rise_fraction"] == 0.0
        assert len(summary["energy"]["E"]) == cfg.model.et.steps + 1
        assert (tmp_path / model / "energy_trace.csv").exists()


def test_gadbench_uses_stored_split(tmp_path: Path, shared_data: Path) -> None:
    if not (shared_data / "tolokers" / "tolokers.npz").exists():
        pytest.skip("tolokers.npz not shipped here")
    cfg = resolve_run_config({"task": {"kind": "graph", "dataset": "tolokers", "protocol": "gadbench", "split": 3},
                              "model": {"name": "mlp"}, "train": {"epochs": 15, "lr": 0.01, "warmup_epochs": 0}})
    res = run_single(cfg, tmp_path / "tol", progress=False)
    assert res.summary["data"]["split_sizes"] == {"train": 5879, "val": 2939, "test": 2940}
    assert res.summary["best"]["test/auroc"] > 0.6


def test_cli_train_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "graph", "--dataset", "synthetic", "--model", "mlp", "--epochs", "2",
               "--out", str(tmp_path / "g")])
    assert rc == 0 and "results in" in capsys.readouterr().out
    assert main(["train", "graph", "--dataset", "synthetic", "--model", "vit", "--out", str(tmp_path / "x")]) == 2


def test_graph_bench_tiny(tmp_path: Path) -> None:
    from etbench.bench.graph import run_graph_bench

    rep = run_graph_bench(tmp_path, dataset="synthetic", repeats=1, scaling_nodes=2000,
                          scaling_edges=(5_000, 10_000, 20_000))
    assert set(rep["results"]) == {"et", "gcn", "bwgnn", "et_T4"}
    assert rep["et_defaults"]["steps"] == 1 and rep["ratios"]["et_T4_epoch_over_gcn"] > 0
    assert rep["memory_scaling"]["points"][-1]["edges"] == 20_000
    assert (tmp_path / "bench_graph.json").exists()
