"""GNN baselines for node anomaly detection (SPEC §3): MLP, GCN, GraphSAGE, GAT, GIN (torch_geometric) and BWGNN.

Every model maps (x (N, F), edge_index (2, E), relations=None) to logits (N, num_classes). edge_index is expected
symmetrised and without self-loops; GCN and GAT add self-loops inside their layers (torch_geometric default), SAGE
and GIN treat the root node separately by design. Layout: ``layers`` graph layers of width ``hidden`` (each
followed by ReLU and dropout), then a Linear head. BWGNN has its own fixed layout (see ``bwgnn.py``) and ignores
``layers``. Only layers that run on a plain edge_index tensor or a torch CSR adjacency are used (no pyg-lib /
torch-sparse needed).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn
from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import sort_edge_index, to_torch_csr_tensor

from etbench.models.baselines.bwgnn import BWGNN, bwgnn_flops, check_node_inputs
from etbench.models.entry import ModelEntry
from etbench.models.node_config import NodeClassifierConfig


class GNNConfig(NodeClassifierConfig):
    """Sizes of a GNN baseline. ``heads`` is used by GAT only; ``order`` and ``bwgnn_mode`` by BWGNN only."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    order: int = 2
    bwgnn_mode: Literal["homo", "hetero"] = "homo"

    @field_validator("hidden", "layers", "heads", "order")
    @classmethod
    def _positive(cls, v: int, info) -> int:  # type: ignore[no-untyped-def]
        if v <= 0:
            raise ValueError(f"{info.field_name} must be a positive integer, got {v}")
        return v


class MLP(nn.Module):
    """Graph-agnostic baseline: ``layers`` × (Linear, ReLU, dropout) then a Linear head."""

    def __init__(self, cfg: GNNConfig) -> None:
        super().__init__()
        self.in_dim = cfg.in_dim
        dims = [cfg.in_dim] + [cfg.hidden] * cfg.layers
        blocks: list[nn.Module] = []
        for d_in, d_out in pairwise(dims):
            blocks += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(cfg.dropout)]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, relations: dict[str, Tensor] | None = None) -> Tensor:
        check_node_inputs(x, edge_index, self.in_dim, "MLP")
        return self.head(self.body(x))


def _conv(name: str, d_in: int, cfg: GNNConfig) -> nn.Module:
    if name == "gcn":  # Kipf & Welling: self-loops + symmetric normalisation, applied once per graph (see _adjacency)
        return GCNConv(d_in, cfg.hidden, normalize=False)
    if name == "sage":  # Hamilton et al.: root + mean of neighbours; the mean's 1/deg sits in the adjacency weights
        return SAGEConv(d_in, cfg.hidden, aggr="sum")
    if name == "gat":
        # hidden is split over the heads and the heads are concatenated, so every model has width `hidden`
        return GATConv(d_in, cfg.hidden // cfg.heads, heads=cfg.heads, concat=True)
    if name == "gin":
        mlp = nn.Sequential(nn.Linear(d_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden))
        return GINConv(mlp, train_eps=True)  # Xu et al.: MLP((1 + ε) x + Σ neighbours)
    raise ValueError(f"unknown message-passing layer {name!r}; allowed: gcn, sage, gat, gin")


class MessagePassingNet(nn.Module):
    """``layers`` × (conv, ReLU, dropout) with one torch_geometric conv kind, then a Linear head."""

    def __init__(self, name: str, cfg: GNNConfig) -> None:
        super().__init__()
        if name == "gat" and cfg.hidden % cfg.heads != 0:
            raise ValueError(f"gat: hidden ({cfg.hidden}) must be divisible by heads ({cfg.heads})")
        self.name, self.in_dim = name, cfg.in_dim
        dims = [cfg.in_dim] + [cfg.hidden] * cfg.layers
        self.convs = nn.ModuleList(_conv(name, d_in, cfg) for d_in in dims[:-1])
        self.act = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout))
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)
        self._adj_cache: tuple[weakref.ref[Tensor], int, int, Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:  # weak references cannot be pickled; the cache is rebuilt on use
        state = super().__getstate__()
        state["_adj_cache"] = None
        return state

    def _adjacency(self, edge_index: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """What the convs consume: for GCN, SAGE and GIN a CSR adjacency Aᵀ (row = target), so torch_geometric
        aggregates with one sparse-dense matmul instead of gathering and scattering per edge (~2-3× faster on CPU);
        for GCN it already holds the self-loops and D^{-1/2}(A + I)D^{-1/2} weights, for SAGE the mean's 1/deg.
        GAT keeps edge_index (its weights are per edge). Cached for the last edge_index seen (same object,
        unmodified, same node count, same dtype)."""
        if self.name == "gat":
            return edge_index
        c = self._adj_cache
        if c is not None and c[0]() is edge_index and c[1] == edge_index._version and c[2] == n and c[3].dtype == dtype:
            return c[3]
        index, weight = edge_index, torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
        if self.name == "gcn":
            index, weight = gcn_norm(edge_index, None, n, add_self_loops=True, dtype=dtype)
        elif self.name == "sage":  # mean over in-edges, duplicates counted as torch_geometric's aggr="mean" does
            deg = torch.bincount(edge_index[1], minlength=n).to(dtype)
            weight = 1.0 / deg[edge_index[1]]
        index_t, weight = sort_edge_index(index.flip(0), weight, num_nodes=n)  # CSR needs rows (targets) sorted
        adj_t = to_torch_csr_tensor(index_t, weight, size=(n, n))
        self._adj_cache = (weakref.ref(edge_index), edge_index._version, n, adj_t)
        return adj_t

    def forward(self, x: Tensor, edge_index: Tensor, relations: dict[str, Tensor] | None = None) -> Tensor:
        check_node_inputs(x, edge_index, self.in_dim, self.name.upper())
        adj = self._adjacency(edge_index, x.size(0), x.dtype)
        for conv in self.convs:
            x = self.act(conv(x, adj))
        return self.head(x)


# --- registry entries: one builder and one per-layer FLOPs form per baseline ----------------------------------
LayerFlops = Callable[[int, int, int, GNNConfig], float]


def _check_sizes(num_nodes: int, num_edges: int, num_relations: int) -> None:
    if num_nodes <= 0 or num_edges < 0 or num_relations <= 0:
        raise ValueError(f"need num_nodes > 0, num_edges ≥ 0, num_relations > 0; got {num_nodes}, {num_edges}, "
                         f"{num_relations}")


def _layered_flops(layer: LayerFlops) -> Callable[..., float]:
    """Analytic forward FLOPs per node of ``layers`` graph layers (``layer(n, e, d_in, cfg)`` each) and the head.

    num_edges counts directed edges of edge_index. 2 FLOPs per multiply-add in Linear layers; a weighted message
    costs 2 FLOPs per feature (multiply + add), an unweighted sum 1; self-loops added by GCN/GAT count as N extra
    edges; GAT's per-edge score, LeakyReLU and softmax count 5 per head. Bias additions and activations are ignored.
    """

    def flops(in_dim: int, num_nodes: int, num_edges: int, num_relations: int = 1, **kw: Any) -> float:
        cfg = GNNConfig(in_dim=in_dim, **kw)
        _check_sizes(num_nodes, num_edges, num_relations)
        total, d_in = 0.0, cfg.in_dim
        for _ in range(cfg.layers):
            total += layer(num_nodes, num_edges, d_in, cfg)
            d_in = cfg.hidden
        return (total + num_nodes * 2 * cfg.hidden * cfg.num_classes) / num_nodes

    return flops


def _mlp_layer(n: int, e: int, d: int, cfg: GNNConfig) -> float:
    return n * 2 * d * cfg.hidden


def _gcn_layer(n: int, e: int, d: int, cfg: GNNConfig) -> float:  # X W, then the weighted sum over edges + loops
    return n * 2 * d * cfg.hidden + (e + n) * 2 * cfg.hidden


def _sage_layer(n: int, e: int, d: int, cfg: GNNConfig) -> float:  # mean, then lin_l(mean) + lin_r(x), their sum
    return e * d + n * d + n * (4 * d * cfg.hidden + cfg.hidden)


def _gat_layer(n: int, e: int, d: int, cfg: GNNConfig) -> float:
    # projection, per-node source/target scores, per-edge softmax and weighted sum
    h = cfg.hidden
    return n * 2 * d * h + n * 4 * h + (e + n) * (5 * cfg.heads + 2 * h)


def _gin_layer(n: int, e: int, d: int, cfg: GNNConfig) -> float:  # (1 + ε) x + Σ neighbours, then the 2-layer MLP
    return e * d + n * 2 * d + n * (2 * d * cfg.hidden + 2 * cfg.hidden * cfg.hidden)


def _bwgnn_flops(in_dim: int, num_nodes: int, num_edges: int, num_relations: int = 1, **kw: Any) -> float:
    """Per node, from ``bwgnn_flops``; num_edges summed over the relations for BWGNN-hetero."""
    cfg = GNNConfig(in_dim=in_dim, **kw)
    _check_sizes(num_nodes, num_edges, num_relations)
    relations = num_relations if cfg.bwgnn_mode == "hetero" else 1
    return bwgnn_flops(cfg.in_dim, cfg.hidden, cfg.num_classes, cfg.order, num_nodes, num_edges, relations) / num_nodes


def _bwgnn(cfg: GNNConfig) -> BWGNN:
    return BWGNN(cfg.in_dim, cfg.hidden, cfg.num_classes, cfg.order, cfg.bwgnn_mode, cfg.dropout)


def _builder(make: Callable[[GNNConfig], nn.Module]) -> Callable[..., nn.Module]:
    def build(in_dim: int, **kw: Any) -> nn.Module:
        return make(GNNConfig(in_dim=in_dim, **kw))

    return build


def _entry(name: str, make: Callable[[GNNConfig], nn.Module], flops: Callable[..., float], summary: str,
           options: tuple[str, ...] = ("hidden", "layers")) -> ModelEntry:
    return ModelEntry(name=name, kind="graph", family="gnn", build=_builder(make), flops=flops, options=options,
                      summary=summary)


ENTRIES = (
    _entry("mlp", MLP, _layered_flops(_mlp_layer), "graph-agnostic: Linear layers on the node features"),
    _entry("gcn", partial(MessagePassingNet, "gcn"), _layered_flops(_gcn_layer), "Kipf & Welling GCN"),
    _entry("sage", partial(MessagePassingNet, "sage"), _layered_flops(_sage_layer), "GraphSAGE, mean aggregation"),
    _entry("gat", partial(MessagePassingNet, "gat"), _layered_flops(_gat_layer), "GAT, heads concatenated"),
    _entry("gin", partial(MessagePassingNet, "gin"), _layered_flops(_gin_layer), "GIN, learnable ε"),
    _entry("bwgnn", _bwgnn, _bwgnn_flops, "Beta-wavelet GNN (fixed layout; ignores layers)", options=("hidden",)),
)
