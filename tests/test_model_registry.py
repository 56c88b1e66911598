"""The model registry (G7): every registered model, of every kind, built at a tiny size through the same path a run
takes, with its parameter count and forward FLOPs per sample against closed forms written here by hand from the
layer shapes. A model added to the registry without its closed forms here fails the test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_pinned_flops import et_step_flops

from etbench.analysis import style
from etbench.config import ModelConfig, allowed_models
from etbench.models import registry
from etbench.models.entry import KINDS, ModelEntry
from etbench.models.et_config import ETConfig

# --- tiny sizes -----------------------------------------------------------------------------------------------------
IMAGE = {"image_shape": (1, 8, 8), "patch": 2}
N, P, T = 16, 4, 17  # patches, pixels per patch, tokens (patches + CLS)
F, NODES, EDGES = 5, 6, 10  # node features, nodes, directed edges (no self-loops)
ET = ETConfig(dim=8, heads=2, head_dim=4, memories=12, steps=2)
MODEL = ModelConfig(et=ET, mlp_ratio=4.0, hidden=8, layers=2)
H, L, C, HEADS = 8, 2, 2, 4  # GNN hidden width, layers, classes; GAT heads (GNNConfig's default)
K, CLS = 3, 3  # graph classification: Laplacian eigenvectors, classes
INPUTS = {"image": IMAGE, "graph": {"in_dim": F}, "graphcls": {"in_dim": F, "num_classes": CLS, "pe_dim": K}}
SIZES = {"image": {}, "graph": {"num_nodes": NODES, "num_edges": EDGES},
         "graphcls": {"num_nodes": NODES, "num_edges": EDGES}}


def et_block_params(cfg: ETConfig) -> int:
    """Energy LayerNorm γ (scalar) and δ (D); W^K, W^Q (H, Y, D); memories ξ (M, D); β of a softmax Hopfield net."""
    d = cfg.dim
    return 1 + d + 2 * cfg.heads * cfg.head_dim * d + cfg.num_memories * d + (cfg.hn_kind == "softmax")


def patch_io_params(d: int) -> int:
    """Patch encoder and decoder (with biases), CLS and MASK tokens, positions of the N + 1 tokens."""
    return (P * d + d) + (d * P + P) + 2 * d + T * d


def vit_block_params(d: int, f: int) -> int:
    """One pre-norm block: QKV and out-projection with biases, the two-layer MLP, two LayerNorms."""
    return (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d


def vit_flops(d: int, f: int, depth: int) -> int:
    """Patch encoder + decoder, then per block application QKV 6TD², out 2TD², scores and ω·V 4T²D, MLP 4TDF."""
    return 4 * N * P * d + depth * (8 * T * d * d + 4 * T * T * d + 4 * T * d * f)


def ladder_case(rung: Any) -> tuple[int, float]:
    """An ET-ladder rung (etbench.models.ladder): per block its LN (γ scalar, or D with a per-feature gain, and δ),
    W^K, W^Q (+ W^V, W^O) (H, Y, D), ξ (+ ξ_down) (M, D); untied: T blocks and an output LN (2D). Per step
    projections and read-outs 2TDHY each (Q, K, read-out; + V; + the second term's read-out through W^K), 2HT²Y for
    scores, ω·V (+ ωᵀ·Q), Hopfield 4TMD."""
    d, hy, m = ET.dim, ET.heads * ET.head_dim, ET.num_memories
    block = (d if rung.feature_norm else 1) + d + 2 * hy * d * (1 + rung.value) + m * d * (1 + rung.untied_hopfield)
    blocks = 1 if rung.tied_steps else ET.steps
    params = patch_io_params(d) + blocks * block + (0 if rung.tied_steps else 2 * d)
    attn = 2 * T * d * hy * (3 + rung.value + rung.second_term) + 2 * hy * T * T * (2 + rung.second_term)
    step = attn + 4 * T * m * d
    return params, 4 * N * P * d + ET.steps * step


def image_cases(model: Any) -> tuple[int, float]:
    """(params, FLOPs per image) of the built image model, by hand."""
    if hasattr(model, "rung"):
        return ladder_case(model.rung)
    if not hasattr(model, "arch"):  # the ET: encoder + decoder, T dense steps over T² (query, key) pairs
        flops = 4 * N * P * ET.dim + ET.steps * et_step_flops(ET, T, T * T)
        return patch_io_params(ET.dim) + et_block_params(ET), flops
    a = model.arch  # a ViT; its final LayerNorm adds 2D
    blocks = 1 if a.tied else a.depth
    params = patch_io_params(a.dim) + blocks * vit_block_params(a.dim, a.mlp_hidden) + 2 * a.dim
    return params, vit_flops(a.dim, a.mlp_hidden, a.depth)


def graph_et() -> tuple[int, float]:
    """Encoder F→D, the ET block, head [LN(x_T), x_0] (2D) → C; T steps over E + N attention edges (self-loops)."""
    d = ET.dim
    pairs = EDGES + NODES if ET.self_attention else EDGES
    flops = 2 * NODES * F * d + ET.steps * et_step_flops(ET, NODES, pairs) + 2 * NODES * 2 * d * C
    return (F * d + d) + et_block_params(ET) + (2 * d * C + C), flops / NODES


def layered(per_layer: Callable[[int], tuple[int, float]]) -> tuple[int, float]:
    """L layers (input width F, then H) given (params, FLOPs on the whole graph) per layer, then the Linear head."""
    params, flops = H * C + C, 2 * NODES * H * C
    for d in [F] + [H] * (L - 1):
        p, f = per_layer(d)
        params, flops = params + p, flops + f
    return params, flops / NODES


n, e = NODES, EDGES
GRAPH: dict[str, Callable[[], tuple[int, float]]] = {
    "et": graph_et,
    # Linear d→H
    "mlp": lambda: layered(lambda d: (d * H + H, n * 2 * d * H)),
    # X W (no bias in the Linear) + bias; normalised weighted sum over E edges + N self-loops (2 per feature)
    "gcn": lambda: layered(lambda d: (d * H + H, n * 2 * d * H + (e + n) * 2 * H)),
    # lin_l (with bias) on the neighbour mean (E·d sums, N·d scalings), lin_r (no bias) on the root, their sum
    "sage": lambda: layered(lambda d: (2 * d * H + H, e * d + n * d + n * (4 * d * H + H))),
    # projection d→H (no bias), attention vectors a_src, a_dst (H each), bias H; per node 4H for the two scores;
    # per edge and self-loop 5 per head (score, LeakyReLU, softmax) and 2H for the weighted sum
    "gat": lambda: layered(lambda d: (d * H + 3 * H, n * 2 * d * H + n * 4 * H + (e + n) * (5 * HEADS + 2 * H))),
    # ε, MLP d→H→H (with biases); (1 + ε)x + Σ neighbours: E·d + 2N·d, then the MLP
    "gin": lambda: layered(lambda d: (1 + d * H + H + H * H + H, e * d + 2 * n * d + n * (2 * d * H + 2 * H * H))),
    # order K = 2: encoder F→H→H; K + 1 filters from K propagations over E + N Laplacian entries (2H each);
    # (K+1)(K+2)/2 = 6 non-zero coefficients (2H each per node); mix (K + 1)H → H; head H → C
    "bwgnn": lambda: ((F * H + H) + (H * H + H) + (3 * H * H + H) + (H * C + C),
                      (n * (2 * F * H + 2 * H * H) + n * (6 * 2 * H + 2 * 3 * H * H) + 2 * 2 * H * (e + n)
                       + n * 2 * H * C) / n),
    # no gradient-trained parameters; per hop a neighbour mean (E·F adds + N·F divides) and max (E·F compares)
    "xgbgraph": lambda: (0, L * F * (2 * e + n) / n),
}



def graphcls_et() -> tuple[int, float]:
    """Per graph: encoder F→D and PE K→D (biases), the CLS vector, L blocks, head D → classes from the CLS token;
    N + 1 tokens attend over E edges + 2N CLS links (+ N + 1 self-loops); L·T steps."""
    d, t = ET.dim, NODES + 1
    pairs = EDGES + 2 * NODES + (t if ET.self_attention else 0)
    params = (F * d + d) + (K * d + d) + d + L * et_block_params(ET) + (d * CLS + CLS)
    flops = 2 * NODES * F * d + 2 * NODES * K * d + L * ET.steps * et_step_flops(ET, t, pairs) + 2 * d * CLS
    return params, flops


def graphcls_gin() -> tuple[int, float]:
    """Per layer d→H: ε, MLP Linear d→H, BatchNorm (γ, β), Linear H→H, then BatchNorm; FLOPs as the node GIN
    layer. Readout per level (input F, then L layers of H): a sum-pool (N·d adds) and a head d → classes."""
    params, flops = 0, 0
    for d in [F] + [H] * (L - 1):
        params += 1 + (d * H + H) + 2 * H + (H * H + H) + 2 * H
        flops += e * d + 2 * n * d + n * (2 * d * H + 2 * H * H)
    for d in [F] + [H] * L:
        params += d * CLS + CLS
        flops += n * d + 2 * d * CLS
    return params, flops


GRAPHCLS: dict[str, Callable[[], tuple[int, float]]] = {
    "et": graphcls_et,
    # φ Linear F→H (2NFH), sum-pool (NH adds), ρ Linear H→H and H→classes
    "mlp": lambda: ((F * H + H) + (H * H + H) + (H * CLS + CLS), 2 * n * F * H + n * H + 2 * H * H + 2 * H * CLS),
    "gin": graphcls_gin,
}
CLOSED = {"graph": GRAPH, "graphcls": GRAPHCLS}

LADDER = tuple(f"ladder-{i}" for i in range(1, 6))
CASES = [(kind, name) for kind in KINDS for name in registry.names(kind)]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_every_registered_model_matches_its_closed_forms(kind: str, name: str) -> None:
    torch.manual_seed(0)
    opts = registry.options(kind, name, MODEL)  # what the engine passes from a run's model config
    model = registry.build(kind, name, **INPUTS[kind], **opts)
    params = sum(p.numel() for p in model.parameters())
    flops = registry.flops(kind, name, **INPUTS[kind], **SIZES[kind], **opts)
    if kind == "image":
        want_params, want_flops = image_cases(model)
        assert flops == model.flops_per_image()
    else:
        assert name in CLOSED[kind], f"{kind} model {name!r} is registered but has no closed form in this test"
        want_params, want_flops = CLOSED[kind][name]()
    assert params == want_params
    assert registry.num_parameters(kind, name, **INPUTS[kind], **opts) == want_params  # the meta-device count
    assert flops == pytest.approx(want_flops, rel=1e-12)


def test_the_parameter_matched_vit_is_within_five_percent_of_the_et() -> None:
    count = {m: registry.num_parameters("image", m, **IMAGE, **registry.options("image", m, MODEL))
             for m in ("et", "vit-pm")}
    assert abs(count["vit-pm"] - count["et"]) / count["et"] <= 0.05


def test_names_kinds_and_families() -> None:
    assert registry.names("image") == ("et", *LADDER, "vit", "vit-tied", "vit-pm")
    assert registry.names("image", family="ladder") == LADDER
    assert registry.names("graph") == ("et", "mlp", "gcn", "sage", "gat", "gin", "bwgnn", "xgbgraph")
    assert registry.names("graph", family="gnn") == registry.names("graph")[1:-1]
    assert registry.names("graph", family="trees") == ("xgbgraph",)
    assert registry.names("graphcls") == ("et", "mlp", "gin")
    assert registry.names("graphcls", family="gnn") == ("mlp", "gin")
    assert registry.names("image", family="vit") == ("vit", "vit-tied", "vit-pm")
    for kind in KINDS:
        assert allowed_models(kind) == registry.names(kind)  # the config asks the registry
        for name in registry.names(kind):
            entry = registry.get(kind, name)
            assert (entry.kind, entry.name) == (kind, name)
            assert set(entry.options) <= set(ModelConfig.model_fields), f"{kind}/{name}: options not in model.*"


def test_unknown_names_and_kinds_give_the_allowed_ones() -> None:
    allowed = ", ".join(("et", *LADDER, "vit", "vit-tied", "vit-pm"))
    with pytest.raises(ValueError, match=rf"unknown image model 'gcn'; allowed: {allowed}$"):
        registry.build("image", "gcn", **IMAGE)
    with pytest.raises(ValueError,
                       match=r"unknown graph model 'vit'; allowed: et, mlp, gcn, sage, gat, gin, bwgnn, xgbgraph$"):
        registry.flops("graph", "vit", in_dim=F, num_nodes=NODES, num_edges=EDGES)
    with pytest.raises(ValueError, match=r"unknown model kind 'video'; allowed: image, graph, graphcls$"):
        registry.names("video")


def test_an_entry_is_registered_once_and_has_a_known_kind() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("graph", "gcn"))
    with pytest.raises(ValueError, match="unknown kind 'video'"):
        ModelEntry(name="x", kind="video", family="x", build=torch.nn.Identity, flops=float)  # type: ignore[arg-type]


def test_the_figure_order_covers_the_registry_in_registry_order() -> None:
    """analysis may not import models, so its display order and palette are a copy; this keeps the copy true."""
    known = registry.all_names()
    assert tuple(m for m in style.MODELS if m in known) == known
    assert set(style.PALETTE) >= set(known)
