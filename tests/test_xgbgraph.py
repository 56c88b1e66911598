"""XGBGraph (issue 27.6): it must use the neighbours, train through the ordinary engine, and checkpoint its trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from etbench.config import ConfigError, resolve_run_config
from etbench.engine.run import run_single
from etbench.models import registry
from etbench.models.baselines.xgbgraph import XGBGraph, aggregate_features


def neighbour_signal_graph(n: int = 800, degree: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Random symmetric graph whose label is a function of the NEIGHBOURS' features only: y_i = 1 when the mean of
    feature 0 over i's neighbours is in its top 15 %. A node's own features carry no signal."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (n * degree // 2,), generator=g)
    dst = torch.randint(0, n, (n * degree // 2,), generator=g)
    keep = src != dst
    ei = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], dim=1)
    ei = torch.unique(ei, dim=1)
    x = torch.randn(n, 4, generator=g)
    nb = aggregate_features(x, ei, 1)[:, 4]  # the neighbour mean of feature 0
    y = (nb > torch.quantile(nb, 0.85)).long()
    return x, ei, y


def auroc_after(model: XGBGraph, x: torch.Tensor, ei: torch.Tensor, y: torch.Tensor, epochs: int = 5) -> float:
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    train, test = perm[: n // 2], perm[n // 2:]
    weight = torch.tensor([1.0, float((y[train] == 0).sum() / (y[train] == 1).sum())])
    losses = [float(model.fit_step(x, ei, train, y, weight, eta=0.3, seed=0)) for _ in range(epochs)]
    assert losses == sorted(losses, reverse=True) and model.num_trees == 10 * epochs  # boosting lowers the loss
    prob = torch.softmax(model(x, ei), -1)[:, 1].numpy()
    return float(roc_auc_score(y[test].numpy(), prob[test.numpy()]))


def test_aggregated_features_equal_a_hand_computation() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [5.0, 4.0], [7.0, 1.0]])
    ei = torch.tensor([[1, 2, 0, 0, 3], [0, 0, 1, 2, 2]])  # node 0 ← 1, 2; 1 ← 0; 2 ← 0, 3; 3 ← nobody
    z = aggregate_features(x, ei, 2)
    mean1 = torch.tensor([[4.0, 2.0], [1.0, -2.0], [4.0, -0.5], [0.0, 0.0]])
    max1 = torch.tensor([[5.0, 4.0], [1.0, -2.0], [7.0, 1.0], [0.0, 0.0]])
    mean2 = torch.stack([(mean1[1] + mean1[2]) / 2, mean1[0], (mean1[0] + mean1[3]) / 2, torch.zeros(2)])
    max2 = torch.stack([torch.maximum(max1[1], max1[2]), max1[0], torch.maximum(max1[0], max1[3]), torch.zeros(2)])
    torch.testing.assert_close(z, torch.cat([x, mean1, max1, mean2, max2], dim=1))


def test_xgbgraph_uses_the_neighbours_and_beats_features_only_xgboost() -> None:
    x, ei, y = neighbour_signal_graph()
    graph_auc = auroc_after(XGBGraph(4, layers=2), x, ei, y)
    features_only = auroc_after(XGBGraph(4, layers=0), x, ei, y)  # the same booster on x alone
    assert graph_auc > 0.9, graph_auc
    assert features_only < 0.65, features_only  # no signal in a node's own features
    assert graph_auc - features_only > 0.3


def test_trees_survive_a_state_dict_round_trip(tmp_path: Path) -> None:
    x, ei, y = neighbour_signal_graph(n=200)
    model = XGBGraph(4, layers=1)
    model.fit_step(x, ei, torch.arange(100), y, torch.tensor([1.0, 5.0]), eta=0.3, seed=0)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = XGBGraph(4, layers=1)
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert other.num_trees == model.num_trees == 10
    torch.testing.assert_close(other(x, ei), model(x, ei), rtol=0, atol=0)
    empty = XGBGraph(4, layers=1)
    empty.load_state_dict(XGBGraph(4, layers=1).state_dict())  # never fitted: margin 0, probability ½
    assert empty.num_trees == 0 and torch.equal(empty(x, ei), torch.zeros(200, 2))


BASE = {"task": {"kind": "graph", "dataset": "synthetic", "protocol": "bwgnn", "train_ratio": 0.4},
        "model": {"name": "xgbgraph"}, "train": {"epochs": 4, "lr": 0.3, "warmup_epochs": 0}}


def test_xgbgraph_trains_through_the_engine_and_resumes_bit_identically(tmp_path: Path) -> None:
    cfg = resolve_run_config(BASE)
    full = run_single(cfg, tmp_path / "full", progress=False)
    row = full.state.history[-1]
    for split in ("val", "test"):
        for k in ("auroc", "auprc", "macro_f1", "rec_at_k"):
            assert 0.0 <= row[f"{split}/{k}"] <= 1.0
    assert row["test/auroc"] > 0.8  # the injected anomalies are visible to neighbour-aggregated features
    losses = [r["train/loss"] for r in full.state.history]
    assert losses == sorted(losses, reverse=True)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["cost"]["params"] == 0 and summary["cost"]["flops_per_sample"] > 0
    # interrupted after 2 epochs, resumed from the checkpoint: the same trees, the same metrics
    run_single(cfg, tmp_path / "cut", progress=False, stop_after_epochs=2)
    resumed = run_single(cfg, tmp_path / "cut", resume=True, progress=False)
    assert [r["test/auroc"] for r in resumed.state.history] == [r["test/auroc"] for r in full.state.history]
    assert resumed.state.history[-1]["val/auprc"] == row["val/auprc"]


@pytest.mark.parametrize(("over", "named"), [({"dist": {"workers": 2}}, "dist.workers 2"),
                                             ({"dist": {"deepspeed": True}}, "dist.deepspeed True"),
                                             ({"task": {"batch_nodes": 64}}, "task.batch_nodes 64")])
def test_settings_a_tree_model_cannot_honour_are_refused(over: dict, named: str) -> None:
    from etbench.config import deep_merge

    with pytest.raises(ConfigError, match=f"'xgbgraph' is not trained by gradient steps.*{named}"):
        resolve_run_config(deep_merge(BASE, over))


def test_registry_entry() -> None:
    entry = registry.get("graph", "xgbgraph")
    assert not entry.differentiable and entry.family == "trees" and entry.options == ("layers",)
    assert all(registry.get("graph", m).differentiable for m in registry.names("graph") if m != "xgbgraph")
    assert np.isclose(registry.flops("graph", "xgbgraph", in_dim=3, num_nodes=10, num_edges=40, layers=2),
                      2 * 3 * (80 + 10) / 10)
