"""XGBGraph: neighbour-aggregated node features + gradient-boosted trees, for node anomaly detection (SPEC §3).

GADBench (Tang et al., NeurIPS 2023 Datasets & Benchmarks) found tree ensembles on neighbour-aggregated features to
be the strongest simple baseline of supervised graph anomaly detection, ahead of most GNNs. This is our version of
that recipe on the ``xgboost`` library:

- features  z_i = [x_i, m¹_i, M¹_i, …, m^L_i, M^L_i] with m^l_i = mean_{j∈N(i)} m^{l-1}_j and
  M^l_i = max_{j∈N(i)} M^{l-1}_j, m⁰ = M⁰ = x (L = ``layers`` hops; a node without neighbours gets zeros);
- a ``binary:logistic`` booster (histogram trees of depth ``TREE_DEPTH``) on the task's training nodes with the
  task's class weights. Every epoch adds ``TREES_PER_EPOCH`` trees at learning rate η = ``train.lr``, so the loop's
  per-epoch validation and best-epoch selection (and checkpoints) work as for the neural models.

The model has no gradient-trained parameters: the graph task calls :meth:`XGBGraph.fit_step` instead of taking a
gradient step (the registry entry says ``differentiable=False``; such models run in one process, full graph).
Its booster travels in the module's state dict (``get_extra_state``), so checkpoints and ``--resume`` hold it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from etbench.models.entry import ModelEntry
from etbench.models.node_config import NodeClassifierConfig

TREE_DEPTH = 6  # xgboost's default depth
TREES_PER_EPOCH = 10


def aggregate_features(x: Tensor, edge_index: Tensor, hops: int) -> Tensor:
    """[x, mean¹, max¹, …, mean^L, max^L] over in-neighbours (messages j → i along ``edge_index``), (N, F·(1+2L))."""
    src, dst = edge_index[0], edge_index[1]
    n = x.shape[0]
    mean, top, parts = x, x, [x]
    for _ in range(hops):
        mean = scatter(mean[src], dst, dim=0, dim_size=n, reduce="mean")
        top = scatter(top[src], dst, dim=0, dim_size=n, reduce="max")
        parts += [mean, top]
    return torch.cat(parts, dim=1)


class XGBGraph(nn.Module):
    """Boosted trees on ``aggregate_features``; ``forward`` gives logits (N, 2) = [0, booster margin]."""

    def __init__(self, in_dim: int, layers: int = 2, num_classes: int = 2) -> None:
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"xgbgraph is a binary (anomaly) classifier: num_classes must be 2, got {num_classes}")
        if layers < 0:
            raise ValueError(f"xgbgraph: layers (neighbour hops) must be >= 0, got {layers}")
        self.in_dim, self.hops = in_dim, layers
        self.booster: Any = None  # xgboost.Booster once fitted
        self._cache: tuple[tuple[Any, ...], np.ndarray] | None = None

    @property
    def num_trees(self) -> int:
        return 0 if self.booster is None else int(self.booster.num_boosted_rounds())

    def features(self, x: Tensor, edge_index: Tensor) -> np.ndarray:
        """The aggregated features as float32 numpy, cached for the same tensors (training and evaluation reuse
        them)."""
        if x.shape[1] != self.in_dim:
            raise ValueError(f"xgbgraph was built for {self.in_dim} node features, got {x.shape[1]}")
        key = (x.data_ptr(), tuple(x.shape), x._version, edge_index.data_ptr(), tuple(edge_index.shape))
        if self._cache is None or self._cache[0] != key:
            z = aggregate_features(x.detach().double(), edge_index, self.hops)  # float32 after summing in float64
            self._cache = (key, z.cpu().numpy().astype(np.float32))
        return self._cache[1]

    def margin(self, x: Tensor, edge_index: Tensor) -> np.ndarray:
        z = self.features(x, edge_index)
        if self.booster is None:
            return np.zeros(z.shape[0], dtype=np.float32)
        import xgboost as xgb

        return self.booster.predict(xgb.DMatrix(z), output_margin=True).astype(np.float32)

    def forward(self, x: Tensor, edge_index: Tensor, relations: Any = None) -> Tensor:
        m = torch.as_tensor(self.margin(x, edge_index), device=x.device)
        return torch.stack([torch.zeros_like(m), m], dim=1)

    def fit_step(self, x: Tensor, edge_index: Tensor, nodes: Tensor, y: Tensor, class_weight: Tensor, *,
                 eta: float, seed: int, trees: int = TREES_PER_EPOCH) -> Tensor:
        """Add ``trees`` trees fitted on ``nodes`` (labels ``y``, per-class weights); returns the class-weighted mean
        cross-entropy of the updated model on those nodes (the loss the neural models report)."""
        import xgboost as xgb

        idx = nodes.cpu().numpy()
        z = self.features(x, edge_index)[idx]
        label = y.cpu().numpy()[idx]
        weight = class_weight.detach().cpu().double().numpy()[label]
        data = xgb.DMatrix(z, label=label.astype(np.float32), weight=weight.astype(np.float32))
        params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": TREE_DEPTH, "eta": eta,
                  "seed": seed, "nthread": torch.get_num_threads(), "verbosity": 0}
        self.booster = xgb.train(params, data, num_boost_round=trees, xgb_model=self.booster)
        p = np.clip(self.booster.predict(data).astype(np.float64), 1e-7, 1 - 1e-7)
        ce = -(label * np.log(p) + (1 - label) * np.log1p(-p))
        return torch.tensor(float((weight * ce).sum() / weight.sum()), dtype=torch.float64)

    # the booster in the state dict (a uint8 tensor of xgboost's UBJSON model), so torch checkpoints hold it
    def get_extra_state(self) -> dict[str, Tensor]:
        if self.booster is None:
            return {"booster": torch.zeros(0, dtype=torch.uint8)}
        raw = bytearray(self.booster.save_raw(raw_format="ubj"))
        return {"booster": torch.frombuffer(raw, dtype=torch.uint8).clone()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        raw = state["booster"]
        if raw.numel() == 0:
            self.booster = None
            return
        import xgboost as xgb

        self.booster = xgb.Booster(model_file=bytearray(raw.cpu().numpy().tobytes()))


def xgbgraph_flops(in_dim: int, num_nodes: int, num_edges: int, num_relations: int = 1, layers: int = 2,
                   **_: Any) -> float:
    """Arithmetic per node of the feature aggregation: each hop, a mean (an add per edge and feature, a divide
    per node and feature) and a max (a compare per edge and feature). Tree traversal (comparisons, one path of
    ``TREE_DEPTH`` per tree, the number of trees set by the epochs) is not counted."""
    if num_nodes <= 0 or num_edges < 0:
        raise ValueError(f"xgbgraph FLOPs need num_nodes > 0 and num_edges >= 0, got {num_nodes}, {num_edges}")
    return layers * in_dim * (2 * num_edges + num_nodes) / num_nodes


def _build(in_dim: int, layers: int = 2, **kw: Any) -> XGBGraph:
    cfg = NodeClassifierConfig(in_dim=in_dim, **kw)
    return XGBGraph(cfg.in_dim, layers, cfg.num_classes)


ENTRIES = (
    ModelEntry(name="xgbgraph", kind="graph", family="trees", build=_build, flops=xgbgraph_flops,
               options=("layers",), differentiable=False,
               summary="GADBench's XGBGraph: mean/max neighbour features over `layers` hops + XGBoost"),
)
