"""Graph numbers pinned: validation-chosen threshold, stored-split identity, k-hop batches = full graph, and
message passing that must use the edges."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from etbench.config import resolve_run_config
from etbench.data.graphs import GraphData, load_graph_dataset
from etbench.models import registry
from etbench.tasks.graph_protocols import best_threshold_macro_f1, binary_metrics
from etbench.tasks.graph_sampling import khop_subgraph
from etbench.tasks.graph_task import GraphTask

DATA = Path(os.environ.get("ETBENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SMALL_ET = {"dim": 16, "heads": 2, "head_dim": 8, "memories": 16}


def _graph(n: int, splits: dict[str, torch.Tensor] | None = None, seed: int = 0) -> GraphData:
    """A random graph (mean degree ~6) whose anomalies (top 20 %) are the nodes whose *neighbours* have a large
    feature 0; a node's own features are independent of its label."""
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n, (3 * n,), generator=g), torch.randint(0, n, (3 * n,), generator=g)
    e = torch.stack([src[src != dst], dst[src != dst]])
    e = torch.unique(torch.cat([e, e.flip(0)], 1), dim=1)
    x = torch.randn(n, 4, generator=g)
    deg = torch.zeros(n).index_add_(0, e[1], torch.ones(e.shape[1])).clamp_min(1)
    neigh = torch.zeros(n).index_add_(0, e[1], x[e[0], 0]) / deg
    y = (neigh > neigh.quantile(0.8)).long()
    return GraphData(name="pinned", x=x, y=y, edge_index=e, relations={"homo": e}, splits=splits, checksum="test")


def _task(graph: GraphData, protocol: str, split: int = 0, model: str = "mlp") -> GraphTask:
    cfg = resolve_run_config({"task": {"kind": "graph", "dataset": "synthetic", "protocol": protocol,
                                       "split": split, "train_ratio": 0.4}, "model": {"name": model}})
    return GraphTask(cfg, graph, torch.device("cpu"))


class _FixedScores(nn.Module):
    """Logits whose anomaly softmax is exactly ``prob`` (an "edge-ignoring model" with scripted scores)."""

    def __init__(self, prob: torch.Tensor) -> None:
        super().__init__()
        self.logit = torch.log(prob) - torch.log1p(-prob)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(self.logit), self.logit], 1)


def test_test_metrics_use_the_threshold_chosen_on_validation() -> None:
    task = _task(_graph(300), "bwgnn")
    y = task.graph.y.numpy()
    val, test = task.idx["val"].numpy(), task.idx["test"].numpy()
    prob = np.full(y.size, 0.1)
    rng = np.random.default_rng(0)
    # validation anomalies score 0.6–0.7; test anomalies only 0.3–0.4 (normals below 0.25 everywhere)
    prob[val] = np.where(y[val] == 1, rng.uniform(0.6, 0.7, val.size), rng.uniform(0.0, 0.25, val.size))
    prob[test] = np.where(y[test] == 1, rng.uniform(0.3, 0.4, test.size), rng.uniform(0.0, 0.25, test.size))
    out = task.evaluate(_FixedScores(torch.tensor(prob, dtype=torch.float32)), lambda t: t)
    p32 = torch.softmax(_FixedScores(torch.tensor(prob, dtype=torch.float32))(None, None), -1)[:, 1].numpy()
    thr_val, _ = best_threshold_macro_f1(y[val], p32[val])
    thr_test, best_test_f1 = best_threshold_macro_f1(y[test], p32[test])
    assert thr_val > 0.5 > thr_test  # the constructed case: the two thresholds differ
    assert out["val/threshold"] == pytest.approx(thr_val)
    want = binary_metrics(y[test], p32[test], thr_val)
    assert out["test/macro_f1"] == pytest.approx(want["macro_f1"])
    assert out["test/macro_f1"] < best_test_f1 - 0.3  # the test-optimal threshold would have scored far higher
    assert out["test/auroc"] == pytest.approx(1.0)  # threshold-free metric unaffected


def _disjoint_masks(n: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    """``s`` stored splits of equal sizes (40/20/40) but different node sets."""
    rng = np.random.default_rng(seed)
    masks = {k: np.zeros((s, n), dtype=bool) for k in ("train", "val", "test")}
    for t in range(s):
        perm = rng.permutation(n)
        masks["train"][t, perm[: 2 * n // 5]] = True
        masks["val"][t, perm[2 * n // 5: 3 * n // 5]] = True
        masks["test"][t, perm[3 * n // 5:]] = True
    return {k: torch.from_numpy(v) for k, v in masks.items()}


def test_gadbench_split_t_is_exactly_mask_t() -> None:
    masks = _disjoint_masks(200, 4, seed=1)
    graph = _graph(200, splits=masks)
    for t in range(4):
        task = _task(graph, "gadbench", split=t)
        for key in ("train", "val", "test"):
            np.testing.assert_array_equal(task.idx[key].numpy(), np.flatnonzero(masks[key][t].numpy()))


def test_gadbench_split_identity_on_tolokers_file() -> None:
    path = DATA / "tolokers" / "tolokers.npz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    raw = np.load(path)
    graph = load_graph_dataset("tolokers", path)
    for t in (0, 7):
        task = _task(graph, "gadbench", split=t)
        for key in ("train", "val", "test"):  # 10 splits of equal sizes: only the identity tells them apart
            np.testing.assert_array_equal(task.idx[key].numpy(), np.flatnonzero(raw[f"{key}_masks"][t]))


def _model(name: str, in_dim: int, steps: int = 2) -> nn.Module:
    torch.manual_seed(0)
    if name == "et":
        return registry.build("graph", "et", in_dim=in_dim, et={**SMALL_ET, "steps": steps})
    if not registry.get("graph", name).differentiable:  # boosted trees: hops of aggregation, fitted by fit_step
        return registry.build("graph", name, in_dim=in_dim, layers=2)
    return registry.build("graph", name, in_dim=in_dim, hidden=16)


def _fit_trees(model: nn.Module, x: torch.Tensor, edge_index: torch.Tensor, y: torch.Tensor, nodes: torch.Tensor,
               rounds: int) -> None:
    for _ in range(rounds):
        model.fit_step(x, edge_index, nodes, y, torch.tensor([1.0, 4.0]), eta=0.3, seed=0)


@pytest.mark.parametrize("name", registry.names("graph"))
def test_khop_batch_seed_logits_equal_full_graph(name: str) -> None:
    """With enough hops for the model's receptive field (+1 for degree normalisations), the seeds' logits from
    their k-hop subgraph equal the full-graph logits (eval mode, float64)."""
    n = 400  # a ring lattice (i ~ i±1, i±2) with a few random chords: large diameter, uneven degrees
    ring = torch.cat([torch.stack([torch.arange(n), (torch.arange(n) + k) % n]) for k in (1, 2)], 1)
    g = torch.Generator().manual_seed(3)
    chords = torch.randint(0, n, (2, 20), generator=g)
    e = torch.cat([ring, chords[:, chords[0] != chords[1]]], 1)
    e = torch.unique(torch.cat([e, e.flip(0)], 1), dim=1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    model = _model(name, 4).double().eval()
    if hasattr(model, "fit_step"):  # an unfitted booster outputs zeros everywhere: fit it to a neighbour label first
        label = (torch.zeros(n).index_add_(0, e[1], x[e[0], 0].float()) > 0).long()
        _fit_trees(model, x, e, label, torch.arange(n), rounds=3)
    hops = 6 if name in ("et", "bwgnn") else 3  # ET T = 2 sees 2T hops; BWGNN's polynomial order
    seeds = torch.tensor([5, 17, 120, 333])
    batch = khop_subgraph(seeds, e, n, hops)
    assert batch.num_nodes < n // 2  # a real subgraph, not the whole graph
    with torch.no_grad():
        full = model(x, e)[seeds]
        sub = model(x[batch.nodes], batch.edge_index)[batch.seed_index]
    torch.testing.assert_close(sub, full, rtol=1e-9, atol=1e-10)


def _fit_auroc(model: nn.Module, graph: GraphData, edge_index: torch.Tensor, epochs: int = 80) -> float:
    tr, te = torch.arange(0, 240), torch.arange(240, graph.num_nodes)
    if hasattr(model, "fit_step"):  # boosted trees: 10 trees per round instead of Adam steps
        _fit_trees(model, graph.x, edge_index, graph.y, tr, rounds=epochs // 10)
        prob = model(graph.x, edge_index).softmax(-1)[:, 1]
        return float(roc_auc_score(graph.y[te].numpy(), prob[te].numpy()))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    weight = torch.tensor([1.0, 4.0])
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(graph.x, edge_index)[tr], graph.y[tr], weight=weight).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        prob = model(graph.x, edge_index).softmax(-1)[:, 1]
    return float(roc_auc_score(graph.y[te].numpy(), prob[te].numpy()))


@pytest.mark.parametrize("name", [m for m in registry.names("graph") if m != "mlp"])
def test_message_passing_uses_the_neighbours(name: str) -> None:
    """The label lives only in the neighbours: own features give AUROC ≈ 0.5, the MLP fails, every GNN, the graph ET
    and XGBGraph learn it — and the same model without edges fails (for XGBGraph: XGBoost on the node features
    alone, issue 27.6)."""
    graph = _graph(600)
    te = slice(240, None)
    own = max(roc_auc_score(graph.y[te], graph.x[te, k]) for k in range(4))
    assert own < 0.6  # features alone carry (almost) nothing
    with_edges = _fit_auroc(_model(name, 4, steps=1), graph, graph.edge_index)
    no_edges = _fit_auroc(_model(name, 4, steps=1), graph, torch.empty(2, 0, dtype=torch.long))
    assert with_edges > 0.65, with_edges
    assert no_edges < 0.6, no_edges
    assert with_edges > no_edges + 0.1


def test_mlp_ignores_edges_and_fails() -> None:
    graph = _graph(600)
    assert _fit_auroc(_model("mlp", 4), graph, graph.edge_index) < 0.6
