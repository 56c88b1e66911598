"""The Energy Transformer on graph nodes (SPEC §1.2, §3): sparse edge energy attention and the GAD model.

Edge direction convention (PyG's ``source_to_target`` flow): ``edge_index[0]`` is the source = key B,
``edge_index[1]`` the destination = query C, so an edge B → C lets C attend to B. On symmetric graphs (every
``GraphData`` loader output) the convention is moot, but the code is exact for directed graphs too.

Never an N×N matrix: the closed-form gradient (used in training and inference) runs on CSR matrices over the edges
(``etbench.models.edge_csr``: SDDMM scores, segment softmax, SpMM aggregation); the energy, which the ``autograd``
mode differentiates and the tests use as oracle, is computed independently from per-edge gathers (scores (E, H),
per-node max by ``torch_geometric.utils.scatter``, sums by ``index_add_``). Scores are not clamped (the authors' GAD
code clamps them to [−5, 5], which makes its update no longer the gradient of its energy).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch_geometric.utils import add_self_loops, coalesce, remove_self_loops, scatter

from etbench.models.baselines.bwgnn import check_node_inputs
from etbench.models.edge_csr import CSRAttentionGrad, EdgePlan, csr_forward
from etbench.models.energy import EnergyAttention, EnergyTrace, EnergyTransformer
from etbench.models.entry import ModelEntry
from etbench.models.et_config import ETConfig
from etbench.models.node_config import NodeClassifierConfig


def _sum_into(values: Tensor, index: Tensor, n: int) -> Tensor:
    """Σ of the rows of ``values`` (E, …) into n buckets by ``index`` (E,) — ``index_add_`` is several times faster
    on CPU than a broadcast ``scatter_add_`` (what ``torch_geometric.utils.scatter(reduce="sum")`` runs)."""
    return values.new_zeros((n, *values.shape[1:])).index_add_(0, index, values)


def _edge_softmax(q: Tensor, k: Tensor, beta: float, src: Tensor, dst: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ω (E, H), softmax of β Q_C·K_B over the edges into each query C; the per-query logsumexp (N, H); and the
    gathered Q_C, K_B per edge (E, H, Y), for reuse.

    The max subtracted for stability is detached (logsumexp and ω do not depend on it); a query without edges gets
    logsumexp 0 and has no ω entries.
    """
    n = q.shape[0]
    q_e, k_e = q.index_select(0, dst), k.index_select(0, src)
    s = beta * (q_e * k_e).sum(-1)  # (E, H)
    m = scatter(s.detach(), dst, 0, n, reduce="max")  # (N, H); 0 where a node has no key
    p = torch.exp(s - m.index_select(0, dst))
    z = _sum_into(p, dst, n)  # ≥ 1 where a node has keys (its max term is exp 0), else 0
    z = torch.where(z > 0, z, torch.ones_like(z))
    return p / z.index_select(0, dst), m + torch.log(z), q_e, k_e


class SparseEnergyAttention(EnergyAttention):
    """Energy attention restricted to graph edges, computed over the edge list (SPEC §1.2).

        S(C) = {B : (B → C) ∈ edges} (∪ {C} when ``self_attention``), self-loops and duplicates removed first
        E^ATT = −(1/β) Σ_h Σ_C logsumexp_{B∈S(C)} (β Q_hC·K_hB)          (a node with S(C) = ∅ contributes 0)
        ∂E/∂g = −Σ_h [W^Q_hᵀ Σ_B ω_h[C,B] K_hB  (scattered to the query C) + W^K_hᵀ Σ_C ω_h[C,B] Q_hC  (to the key B)]

    Tokens g are (N, D) — one graph is one sample — so energies are 0-d tensors. ``ctx`` is the raw edge_index
    (2, E); its cleaned form is cached for the last edge_index seen (keyed by identity and in-place version), so
    the T descent steps of one forward (and later forwards on the same graph) clean it once. Memory: O(E'·H·Y)
    transient (the oracle's gathers; the CSR gradient needs only O(E'·H)), never N×N; in training the closed-form
    gradient keeps the attention weights P and Pᵀ (2·E'·H floats) per step for backward
    (``edge_csr.CSRAttentionGrad``).
    """

    def __init__(self, cfg: ETConfig) -> None:
        super().__init__(cfg)  # W^K, W^Q (H, Y, D) and β = 1/√Y exactly as the dense module
        self._edge_cache: tuple[weakref.ref[Tensor], int, int, Tensor, EdgePlan] | None = None

    def __getstate__(self) -> dict[str, Any]:  # weak references cannot be pickled; the cache is rebuilt on use
        state = super().__getstate__()
        state["_edge_cache"] = None
        return state

    # --- edges ------------------------------------------------------------------------------------------------
    def prepare_edges(self, edge_index: Tensor, num_nodes: int) -> Tensor:
        """Validated (2, E') attention edges: self-loops and duplicates removed, then one self-loop per node when
        ``self_attention``."""
        if not isinstance(edge_index, Tensor):
            raise TypeError(f"sparse energy attention needs the edge_index tensor as ctx, got {type(edge_index)}")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.long:
            raise ValueError(f"edge_index must be an int64 tensor of shape (2, E), got {edge_index.dtype} "
                             f"{tuple(edge_index.shape)}")
        if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
            raise ValueError(f"edge_index holds node ids in [{int(edge_index.min())}, {int(edge_index.max())}], "
                             f"outside [0, {num_nodes}) for {num_nodes} tokens")
        ei, _ = remove_self_loops(edge_index)
        ei = coalesce(ei, num_nodes=num_nodes)
        if self.self_attention:
            ei, _ = add_self_loops(ei, num_nodes=num_nodes)
        return ei

    def _cached(self, ctx: Tensor | None, num_nodes: int) -> tuple[Tensor, EdgePlan]:
        """(``prepare_edges(ctx)``, its ``EdgePlan``), cached for the last ctx tensor (same object, unmodified, same
        node count)."""
        if ctx is None:
            raise ValueError("sparse energy attention needs the graph: pass edge_index as ctx (descend(..., mask=))")
        c = self._edge_cache
        if c is not None and c[0]() is ctx and c[1] == ctx._version and c[2] == num_nodes:
            return c[3], c[4]
        out = self.prepare_edges(ctx, num_nodes)
        plan = EdgePlan.build(out, num_nodes, self.heads)
        self._edge_cache = (weakref.ref(ctx), ctx._version, num_nodes, out, plan)
        return out, plan

    def edges(self, ctx: Tensor | None, num_nodes: int) -> Tensor:
        """The attention edges (2, E') of ``ctx`` (see ``prepare_edges``), cached."""
        return self._cached(ctx, num_nodes)[0]

    def plan(self, ctx: Tensor | None, num_nodes: int) -> EdgePlan:
        """The CSR layout of the attention edges for this module's heads, cached with the edges."""
        return self._cached(ctx, num_nodes)[1]

    def _check(self, g: Tensor, ctx: Tensor | None) -> tuple[Tensor, EdgePlan]:
        if g.dim() != 2:
            raise ValueError(f"graph tokens must be (N, D) (one graph = one sample), got shape {tuple(g.shape)}")
        edges, plan = self._cached(ctx, g.shape[0])
        if edges.device != g.device:
            raise ValueError(f"edge_index is on {edges.device} but the node tokens are on {g.device}")
        return edges, plan

    # --- energy and gradient --------------------------------------------------------------------------------
    def energy(self, g: Tensor, ctx: Tensor | None = None) -> Tensor:
        """E^ATT of the graph, a 0-d tensor (differentiable: the ``autograd`` gradient mode differentiates it)."""
        src, dst = self._check(g, ctx)[0]
        q, k = (t.transpose(0, 1) for t in self._qk(g))  # (N, H, Y)
        return -_edge_softmax(q, k, self.beta, src, dst)[1].sum() / self.beta

    def query_energies(self, g: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Each query's share of E^ATT, −(1/β) Σ_h logsumexp_{B∈S(C)} β Q_hC·K_hB, shape (N,); they sum to
        ``energy`` (a batch of disjoint graphs sums them per graph)."""
        src, dst = self._check(g, ctx)[0]
        q, k = (t.transpose(0, 1) for t in self._qk(g))
        return -_edge_softmax(q, k, self.beta, src, dst)[1].sum(-1) / self.beta

    def grad(self, g: Tensor, ctx: Tensor | None = None, need_energy: bool = True) -> tuple[Tensor, Tensor]:
        """Closed-form (∂E^ATT/∂g (N, D), E^ATT 0-d detached). The energy comes for free with the gradient, so it
        is always returned (``need_energy`` is accepted for the ``Attention`` protocol)."""
        plan = self._check(g, ctx)[1]
        if torch.is_grad_enabled():
            out, energy = CSRAttentionGrad.apply(g, self.wq, self.wk, self.beta, plan)
            return out, energy
        out, energy, _ = csr_forward(plan, g, self.wq, self.wk, self.beta)
        return out, energy


# --- the graph anomaly detection model ------------------------------------------------------------------------
GAD_ET_DEFAULTS: dict[str, Any] = {"dim": 64, "heads": 4, "head_dim": 16, "mem_ratio": 2.0, "steps": 1, "alpha": 1.0,
                                   "attn_init_std": 0.1}


class GraphETConfig(NodeClassifierConfig):
    """Sizes of the graph ET (SPEC §3). ``et`` given as a mapping is merged over ``GAD_ET_DEFAULTS``.

    etbench defaults: D = 64, H = 4, Y = 16, M = 2·D, one update (T = 1) of step size α = 1 from attention weights
    W^K, W^Q ~ N(0, 0.1²) — the dynamics of the authors' GAD code (zhuergou/Energy-Transformer-for-Graph-Anomaly-
    Detection: D = 64, 1–3 heads of width Y = D, Hopfield hidden layer 2·D, a single update of step 1 with a learnable
    β, clamped scores and plain LayerNorm, dropout 0.3, Adam lr 1e-3, 100 epochs), with the exact energy kept.
    Why not the image defaults (T = 4, α = 0.1, SPEC §1.5 init N(0, 0.002²)): the attention term then moves the
    tokens by ~1e-5 at first; on Facebook a short training scores like the MLP (AUROC ~0.6) while these defaults
    clearly beat it (tests), and on Amazon U-P-U (40 %, split 0, 100 epochs) both reach the same test AUROC (0.979
    vs 0.977) at a quarter of the cost. ``experiments/graph_steps.yaml`` measures T. ``dropout`` acts on the readout
    input only, so the descent stays a descent.
    """

    et: ETConfig = Field(default_factory=lambda: ETConfig(**GAD_ET_DEFAULTS))

    @field_validator("et", mode="before")
    @classmethod
    def _gad_defaults(cls, v: object) -> object:
        return {**GAD_ET_DEFAULTS, **v} if isinstance(v, Mapping) else v


class GraphET(nn.Module):
    """Node tokens = Linear(features); T steps of ET descent with attention over edges; energy LayerNorm;
    logits = Linear([LN(final tokens), encoded input tokens]) (SPEC §3). LN is the block's own energy LayerNorm,
    so LN(x_T) is the g the descent acts on.

    Same interface as the GNN baselines: ``forward(x, edge_index, relations=None) -> logits (N, num_classes)``.
    ``relations`` is ignored: the caller passes the homogeneous union of relations as ``edge_index``.
    """

    def __init__(self, cfg: GraphETConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.et.dim
        self.encoder = nn.Linear(cfg.in_dim, d)
        self.et = EnergyTransformer(cfg.et, attention=SparseEnergyAttention(cfg.et))
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * d, cfg.num_classes)

    def _run(self, x: Tensor, edge_index: Tensor, trace: bool) -> tuple[Tensor, EnergyTrace | None]:
        check_node_inputs(x, edge_index, self.cfg.in_dim, "GraphET")
        h = self.encoder(x)
        out, tr = self.et.descend(h, mask=edge_index, trace=trace)
        return self.head(self.dropout(torch.cat([self.et.norm(out), h], -1))), tr

    def forward(self, x: Tensor, edge_index: Tensor, relations: Mapping[str, Tensor] | None = None) -> Tensor:
        return self._run(x, edge_index, trace=False)[0]

    def forward_with_trace(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, EnergyTrace]:
        """Logits and the energy trace of the descent (energies of the whole graph, shape (T + 1,))."""
        logits, tr = self._run(x, edge_index, trace=True)
        assert tr is not None
        return logits, tr

    def flops_per_node(self, num_nodes: int, num_edges: int) -> float:
        """Analytic forward FLOPs per node (see ``graph_et_flops_per_node``)."""
        return graph_et_flops_per_node(self.cfg, num_nodes, num_edges)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def graph_et_flops_per_node(cfg: GraphETConfig, num_nodes: int, num_edges: int) -> float:
    """Analytic forward FLOPs per node of ``GraphET`` (2 per multiply-add), counted like ``EnergyTransformer``.

    ``num_edges``: directed edges of edge_index without self-loops (each undirected edge counts twice); with
    ``self_attention`` N self-loops are added (E'). Per step: fused Q/K projection 4NDHY and read-out 4NDHY, per-edge
    scores, ω·K and ωᵀ·Q 6E'HY, Hopfield 4NMD; once: encoder 2NFD and head 2N·2D·classes. Element-wise work
    (LN, exp, scatter max/sum) is not counted.
    """
    if num_nodes <= 0 or num_edges < 0:
        raise ValueError(f"need num_nodes > 0 and num_edges ≥ 0, got {num_nodes}, {num_edges}")
    c = cfg.et
    n, d, h, y = num_nodes, c.dim, c.heads, c.head_dim
    e = num_edges + (n if c.self_attention else 0)
    attn = 8 * n * d * h * y + 6 * e * h * y if c.use_attn else 0
    hn = 4 * n * c.num_memories * d if c.use_hn else 0
    total = 2 * n * cfg.in_dim * d + c.steps * (attn + hn) + 2 * n * 2 * d * cfg.num_classes
    return total / n


def _build(in_dim: int, **kw: Any) -> GraphET:
    return GraphET(GraphETConfig(in_dim=in_dim, **kw))


def _flops(in_dim: int, num_nodes: int, num_edges: int, num_relations: int = 1, **kw: Any) -> float:
    """Per node (``graph_et_flops_per_node``); the caller passes the union of relations, so ``num_relations`` is
    not used."""
    return graph_et_flops_per_node(GraphETConfig(in_dim=in_dim, **kw), num_nodes, num_edges)


ENTRIES = (
    ModelEntry(name="et", kind="graph", family="et", build=_build, flops=_flops, options=("et",),
               summary="the graph ET: energy descent with attention over the edges (GAD)"),
)
