"""GNN baselines (SPEC §3): shapes, gradients, learning, BWGNN filter bank against dense spectral oracles, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score
from torch.utils.flop_counter import FlopCounterMode
from torch_geometric.utils import to_undirected

from etbench.models import registry
from etbench.models.baselines.bwgnn import beta_wavelet_coefficients, beta_wavelet_filter_bank
from etbench.models.baselines.gnn import GNNConfig

GNN_MODELS = registry.names("graph", family="gnn")


def build_gnn(name: str, cfg: GNNConfig) -> torch.nn.Module:
    return registry.build("graph", name, **cfg.model_dump())


def gnn_flops_per_node(name: str, cfg: GNNConfig, n: int, e: int) -> float:
    return registry.flops("graph", name, num_nodes=n, num_edges=e, **cfg.model_dump())


def random_graph(n: int, avg_degree: float, seed: int) -> torch.Tensor:
    """Symmetrised random edge_index without self-loops or duplicates."""
    g = torch.Generator().manual_seed(seed)
    m = int(n * avg_degree / 2)
    src, dst = torch.randint(0, n, (2, m), generator=g)
    keep = src != dst
    return to_undirected(torch.stack([src[keep], dst[keep]]), num_nodes=n)


def anomaly_graph(n: int = 200, f: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random graph, 10% anomalies whose features are shifted by +2 in every dimension."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, dtype=torch.long)
    y[torch.randperm(n, generator=g)[: n // 10]] = 1
    x = torch.randn(n, f, generator=g) + 2.0 * y[:, None]
    return x, random_graph(n, 3.0, seed), y


@pytest.mark.parametrize("name", GNN_MODELS)
def test_forward_backward_shapes(name: str) -> None:
    torch.manual_seed(0)
    x, edge_index = torch.randn(30, 5), random_graph(30, 4.0, 1)
    model = build_gnn(name, GNNConfig(in_dim=5, hidden=16, num_classes=3, dropout=0.1))
    out = model(x, edge_index)
    assert out.shape == (30, 3)
    out.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no/invalid gradient for {pname}"


@pytest.mark.parametrize("name", [*GNN_MODELS, "bwgnn-hetero"])
def test_learns_shifted_anomalies(name: str) -> None:
    torch.manual_seed(0)
    x, edge_index, y = anomaly_graph()
    hetero = name == "bwgnn-hetero"
    cfg = GNNConfig(in_dim=x.size(1), hidden=32, bwgnn_mode="hetero" if hetero else "homo")
    model = build_gnn("bwgnn" if hetero else name, cfg)
    relations = {f"r{i}": random_graph(200, 1.5, 10 + i) for i in range(3)} if hetero else None
    weight = torch.tensor([1.0, float((y == 0).sum() / (y == 1).sum())])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, edge_index, relations), y, weight=weight)
        loss.backward()
        opt.step()
    with torch.no_grad():
        prob = model(x, edge_index, relations).softmax(-1)[:, 1]
    assert roc_auc_score(y.numpy(), prob.numpy()) > 0.9


def dense_sym_laplacian(edge_index: torch.Tensor, n: int) -> np.ndarray:
    a = np.zeros((n, n))
    a[edge_index[0].numpy(), edge_index[1].numpy()] = 1.0
    deg = a.sum(1)
    d = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    return np.eye(n) - d[:, None] * a * d[None, :]


def tiny_graph() -> tuple[torch.Tensor, int]:
    """7 nodes: a triangle with a tail, a separate edge and one isolated node (6)."""
    und = torch.tensor([[0, 1, 2, 2, 4], [1, 2, 0, 3, 5]])
    return to_undirected(und, num_nodes=7), 7


@pytest.mark.parametrize("order", [1, 2, 3])
def test_filter_bank_matches_dense_spectral_oracle(order: int) -> None:
    edge_index, n = tiny_graph()
    lap = dense_sym_laplacian(edge_index, n)
    lam, u = np.linalg.eigh(lap)
    x = np.random.default_rng(0).normal(size=(n, 4))
    bank = beta_wavelet_filter_bank(torch.tensor(x), edge_index, order).numpy()
    assert bank.shape == (order + 1, n, 4)
    w = lam / 2
    for i in range(order + 1):
        beta_i = w**i * (1 - w) ** (order - i) / (2 * scipy.special.beta(i + 1, order + 1 - i))
        expected = u @ np.diag(beta_i) @ u.T @ x  # spectral definition U β_i(Λ/2) Uᵀ X
        np.testing.assert_allclose(bank[i], expected, rtol=0, atol=1e-12)
    # Σ_i β_i(w) = (C+1)/2 · Σ_i binom(C,i) w^i (1−w)^{C−i} = (C+1)/2, so the bank sums to (C+1)/2 · X
    np.testing.assert_allclose(bank.sum(0), (order + 1) / 2 * x, rtol=0, atol=1e-12)


def test_beta_coefficients_by_hand() -> None:
    # C = 2: β_0(L/2) = 3/2 (1 − L/2)² = 3/2 − 3/2 L + 3/8 L²;  β_1 = 3 (L/2)(1 − L/2) = 3/2 L − 3/4 L²;  β_2 = 3/8 L²
    expected = np.array([[1.5, -1.5, 0.375], [0.0, 1.5, -0.75], [0.0, 0.0, 0.375]])
    np.testing.assert_array_equal(beta_wavelet_coefficients(2), expected)
    with pytest.raises(ValueError, match="order"):
        beta_wavelet_coefficients(0)


def test_bwgnn_hetero_three_relations() -> None:
    torch.manual_seed(0)
    x, edge_index = torch.randn(40, 6), random_graph(40, 4.0, 0)
    rels = {name: random_graph(40, 3.0, s) for s, name in enumerate(("upu", "usu", "uvu"), start=1)}
    model = build_gnn("bwgnn", GNNConfig(in_dim=6, hidden=8, bwgnn_mode="hetero")).eval().requires_grad_(False)
    out = model(x, edge_index, rels)
    assert out.shape == (40, 2)
    # relations are really used: changing one relation changes the output
    assert not torch.allclose(out, model(x, edge_index, {**rels, "usu": random_graph(40, 3.0, 99)}))
    # max over a single relation is that relation alone, and relations=None falls back to edge_index
    torch.testing.assert_close(model(x, edge_index, None), model(x, edge_index, {"homo": edge_index}))
    # the homogeneous variant ignores relations and uses edge_index
    homo = build_gnn("bwgnn", GNNConfig(in_dim=6, hidden=8)).eval().requires_grad_(False)
    torch.testing.assert_close(homo(x, edge_index, rels), homo(x, edge_index))
    with pytest.raises(ValueError, match="empty"):
        model(x, edge_index, {})


def test_config_and_name_errors() -> None:
    with pytest.raises(ValueError, match="allowed: et, mlp, gcn, sage, gat, gin, bwgnn"):
        build_gnn("gcnn", GNNConfig(in_dim=3))
    for bad, field in (({"hidden": 0}, "hidden"), ({"dropout": 1.0}, "dropout"), ({"num_classes": 1}, "num_classes")):
        with pytest.raises(ValidationError, match=field):
            GNNConfig(in_dim=3, **bad)
    with pytest.raises(ValidationError, match="'homo' or 'hetero'"):
        GNNConfig(in_dim=3, bwgnn_mode="multi")
    with pytest.raises(ValidationError, match="extra"):
        GNNConfig(in_dim=3, width=5)
    with pytest.raises(ValueError, match="divisible by heads"):
        build_gnn("gat", GNNConfig(in_dim=3, hidden=10, heads=4))
    model = build_gnn("gcn", GNNConfig(in_dim=3))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        model(torch.randn(5, 4), random_graph(5, 2.0, 0))
    with pytest.raises(ValueError, match="int64"):
        model(torch.randn(5, 3), random_graph(5, 2.0, 0).int())


def counted_flops(model: torch.nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x, edge_index)
    return counter.get_total_flops()


def test_flops_against_torch_counter() -> None:
    n, f = 50, 7
    x, edge_index = torch.randn(n, f), random_graph(n, 4.0, 0)
    e = edge_index.size(1)
    cfg = GNNConfig(in_dim=f, hidden=16, layers=2)
    # MLP: only matmuls, so the analytic count equals torch's counter exactly
    assert gnn_flops_per_node("mlp", cfg, n, e) == counted_flops(build_gnn("mlp", cfg), x, edge_index) / n
    # GCN: torch counts the matmuls; the analytic count adds 2·hidden per edge (+ self-loop) per layer
    edge_work = cfg.layers * (e + n) * 2 * cfg.hidden
    assert gnn_flops_per_node("gcn", cfg, n, e) * n - edge_work == counted_flops(build_gnn("gcn", cfg), x, edge_index)
    # BWGNN (in 3, hidden 4, 2 classes, C = 2) on N = 10, E = 20, by hand:
    # encoder 10·(2·3·4 + 2·4·4) = 560; 6 non-zero filter terms · 2·4 and mix Linear 2·12·4 per node: 10·(48 + 96)
    # = 1440; C = 2 propagations over E + N entries: 2·2·4·30 = 480; head 10·2·4·2 = 160 → 2640 / 10 nodes
    assert gnn_flops_per_node("bwgnn", GNNConfig(in_dim=3, hidden=4), 10, 20) == 264.0
    with pytest.raises(ValueError, match="allowed"):
        gnn_flops_per_node("gnn", cfg, n, e)


@pytest.mark.parametrize("name", ["gcn", "sage", "gin"])
def test_csr_adjacency_path_equals_torch_geometric_on_edge_index(name: str) -> None:
    """The cached CSR adjacency (GCN: self-loops and symmetric weights; SAGE: 1/deg) gives what torch_geometric's
    layers give on the plain edge_index (GCN with its own normalisation, SAGE with aggr="mean"), forward and
    backward, on a multigraph (duplicate edges count twice, as in torch_geometric)."""
    from torch_geometric.nn import GCNConv, SAGEConv

    from etbench.models.baselines.gnn import GNNConfig, MessagePassingNet

    torch.manual_seed(0)
    n = 40
    src, dst = torch.randint(0, n, (2, 120))
    keep = src != dst
    ei = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    assert torch.unique(ei, dim=1).shape[1] < ei.shape[1]  # duplicates present
    x = torch.randn(n, 6)
    net = MessagePassingNet(name, GNNConfig(in_dim=6, hidden=8, layers=2)).double()
    ref_convs = []
    for conv in net.convs:
        if name == "gcn":
            ref = GCNConv(conv.in_channels, conv.out_channels).double()
        elif name == "sage":
            ref = SAGEConv(conv.in_channels, conv.out_channels, aggr="mean").double()
        else:
            ref = conv
        ref.load_state_dict(conv.state_dict())
        ref_convs.append(ref)

    def reference(x: torch.Tensor) -> torch.Tensor:
        for conv in ref_convs:
            x = net.act(conv(x, ei))
        return net.head(x)

    xd = x.double().requires_grad_(True)
    got, want = net(xd, ei), reference(xd)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(got.square().sum(), xd)
    (g2,) = torch.autograd.grad(want.square().sum(), xd)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert net._adjacency(ei, n, torch.float64) is net._adjacency(ei, n, torch.float64)  # cached per graph
