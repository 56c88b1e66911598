"""Graph classification baselines (SPEC §5, the review's E7): GIN and a structure-agnostic sum-pool MLP.

Both map ``(x (N, F), edge_index (2, E), batch (N,), num_graphs=None, pe=None)`` to logits (G, num_classes); they
take no positional encoding (``pe`` is accepted and ignored, so every graph classifier is called alike).

- ``gin`` (Xu et al., "How Powerful are Graph Neural Networks?", ICLR 2019): ``layers`` × GINConv with the MLP
  Linear → BatchNorm → ReLU → Linear, learned ε, then BatchNorm → ReLU; readout sums every level's node states per
  graph (the input features and each layer's output) and adds one Linear per level, as their graph-classification
  model does.
- ``mlp`` (Errica et al., "A Fair Comparison of Graph Neural Networks for Graph Classification", ICLR 2020, their
  structure-agnostic baseline): ρ(Σ_v φ(x_v)) with φ = Linear → ReLU per node and ρ = Linear → ReLU → Linear.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch_geometric.nn import GINConv, global_add_pool

from etbench.models.entry import ModelEntry
from etbench.models.graphcls import check_graph_batch, graph_count


class GraphClsBaselineConfig(BaseModel):
    """Input width, classes, hidden width and depth (``layers`` is used by GIN only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(gt=0)
    num_classes: int = Field(2, ge=2)
    hidden: int = Field(64, ge=1)
    layers: int = Field(4, ge=1)


class GINClassifier(nn.Module):
    """GIN with a sum readout of every level (Xu et al. 2019)."""

    def __init__(self, cfg: GraphClsBaselineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        dims = [cfg.in_dim] + [h] * cfg.layers
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h)), train_eps=True)
            for d in dims[:-1])
        self.norms = nn.ModuleList(nn.Sequential(nn.BatchNorm1d(h), nn.ReLU()) for _ in range(cfg.layers))
        self.heads = nn.ModuleList(nn.Linear(d, cfg.num_classes) for d in dims)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int | None = None,
                pe: Tensor | None = None) -> Tensor:
        check_graph_batch(x, edge_index, batch, self.cfg.in_dim, "GIN")
        g = graph_count(batch, num_graphs)
        out = self.heads[0](global_add_pool(x, batch, g))
        for conv, norm, head in zip(self.convs, self.norms, self.heads[1:], strict=True):
            x = norm(conv(x, edge_index))
            out = out + head(global_add_pool(x, batch, g))
        return out


class SumPoolMLP(nn.Module):
    """Structure-agnostic: ρ(Σ_v φ(x_v)) (Errica et al. 2020); edges are never read."""

    def __init__(self, cfg: GraphClsBaselineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.phi = nn.Sequential(nn.Linear(cfg.in_dim, h), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, cfg.num_classes))

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, num_graphs: int | None = None,
                pe: Tensor | None = None) -> Tensor:
        check_graph_batch(x, edge_index, batch, self.cfg.in_dim, "MLP")
        return self.rho(global_add_pool(self.phi(x), batch, graph_count(batch, num_graphs)))


# --- analytic FLOPs per graph (2 per multiply-add; a plain sum 1 per feature; BatchNorm and ReLU not counted) ----
def _check(num_nodes: float, num_edges: float) -> None:
    if num_nodes <= 0 or num_edges < 0:
        raise ValueError(f"need num_nodes > 0 and num_edges ≥ 0, got {num_nodes}, {num_edges}")


def gin_flops(cfg: GraphClsBaselineConfig, n: float, e: float) -> float:
    """Per layer (d → H): Σ neighbours e·d, (1 + ε)x + Σ 2n·d, MLP n(2dH + 2H²); readout: per level a sum-pool
    n·d and a head 2d·C."""
    _check(n, e)
    h, c = cfg.hidden, cfg.num_classes
    dims = [cfg.in_dim] + [h] * cfg.layers
    layers = sum(e * d + 2 * n * d + n * (2 * d * h + 2 * h * h) for d in dims[:-1])
    return float(layers + sum(n * d + 2 * d * c for d in dims))


def mlp_flops(cfg: GraphClsBaselineConfig, n: float, e: float) -> float:
    """φ 2nFH, sum-pool nH, ρ 2H² + 2HC."""
    _check(n, e)
    h = cfg.hidden
    return float(2 * n * cfg.in_dim * h + n * h + 2 * h * h + 2 * h * cfg.num_classes)


def _entry(name: str, cls: type[nn.Module], flops: Any, options: tuple[str, ...], summary: str) -> ModelEntry:
    def build(in_dim: int, num_classes: int, pe_dim: int = 0, **kw: Any) -> nn.Module:
        return cls(GraphClsBaselineConfig(in_dim=in_dim, num_classes=num_classes, **kw))

    def cost(in_dim: int, num_classes: int, num_nodes: float, num_edges: float, pe_dim: int = 0,
             **kw: Any) -> float:
        return flops(GraphClsBaselineConfig(in_dim=in_dim, num_classes=num_classes, **kw), num_nodes, num_edges)

    return ModelEntry(name=name, kind="graphcls", family="gnn", build=build, flops=cost, options=options,
                      summary=summary)


ENTRIES = (
    _entry("mlp", SumPoolMLP, mlp_flops, ("hidden",), "structure-agnostic sum-pool MLP (Errica et al. 2020)"),
    _entry("gin", GINClassifier, gin_flops, ("hidden", "layers"), "GIN, sum readout of every level (Xu et al. 2019)"),
)
