"""Node-level graph anomaly detection as the training loop sees it (SPEC §3).

One epoch = one full-graph step (or, with ``task.batch_nodes``, k-hop subgraph mini-batches of training seeds) on a
class-weighted cross-entropy over training nodes. Evaluation runs the full graph: the decision threshold is the one
maximising validation macro-F1 (protocol ``bwgnn``); AUROC, AUPRC, macro-F1 and Rec@K are reported on val and test.
With several workers, each takes a shard of the training nodes and scales its loss so that the ranks' averaged
gradients equal the full-batch ones exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from etbench.config import GraphTaskConfig, RunConfig
from etbench.data.graphs import GraphData, load_graph_dataset
from etbench.data.paths import resolve_data_path
from etbench.models import registry
from etbench.models.energy import EnergyTrace
from etbench.tasks.graph_protocols import (
    anomaly_class_weight,
    best_threshold_macro_f1,
    binary_metrics,
    gadbench_fallback_split,
    stored_split,
    stratified_split,
)


def protocol_split(graph: GraphData, task: GraphTaskConfig) -> dict[str, np.ndarray]:
    """Index arrays train/val/test for the task's protocol; ``task.split`` selects the split (seed or stored)."""
    y = graph.y.numpy()
    labelled = graph.labelled_mask.numpy()
    if task.protocol == "bwgnn":
        return stratified_split(y, task.train_ratio, seed=task.split, labelled_mask=labelled)
    if graph.splits:
        return stored_split(graph.splits, task.split)
    return gadbench_fallback_split(y, seed=task.split, labelled_mask=labelled)


class GraphTask:
    """One GAD run's data (on ``device``), split, loss and metrics."""

    best_mode = "max"

    def __init__(self, cfg: RunConfig, graph: GraphData, device: torch.device, rank: int = 0, world: int = 1,
                 input_dtype: torch.dtype = torch.float32) -> None:
        assert isinstance(cfg.task, GraphTaskConfig)
        self.cfg, self.graph, self.device, self.rank, self.world = cfg, graph, device, rank, world
        self.best_metric = "val/macro_f1" if cfg.task.protocol == "bwgnn" else "val/auroc"
        split = protocol_split(graph, cfg.task)
        self.idx = {k: torch.as_tensor(v, dtype=torch.long) for k, v in split.items()}
        x = graph.x.float()
        tr = self.idx["train"]
        mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)  # standardise with training statistics only
        self.x = ((x - mean) / std).to(device, input_dtype)
        self.y = graph.y.to(device)
        self.edge_index = graph.edge_index.to(device)
        self.train_shard = tr[rank::world].to(device)
        self.class_weight = anomaly_class_weight(graph.y[tr]).to(device)
        self.train_weight_total = float(self.class_weight.cpu()[graph.y[tr]].sum())
        self.samples_per_epoch = int(self.train_shard.numel())
        self.sampler = None
        if cfg.task.batch_nodes:
            from etbench.tasks.graph_sampling import KHopSampler

            self.sampler = KHopSampler(graph.edge_index, graph.num_nodes, hops=cfg.task.hops,
                                       batch_size=cfg.task.batch_nodes, seed=cfg.train.seed)

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1,
                    input_dtype: torch.dtype = torch.float32) -> GraphTask:
        assert isinstance(cfg.task, GraphTaskConfig)
        graph = load_graph_dataset(cfg.task.dataset, resolve_data_path(cfg.task.path))
        return cls(cfg, graph, device, rank, world, input_dtype)

    # --- training ----------------------------------------------------------------------------------------
    def num_train_batches(self) -> int:
        if self.sampler is None:
            return 1
        return len(self.sampler.seed_batches(self.train_shard.cpu(), 0))

    def train_batches(self, epoch: int) -> Iterator[Any]:
        if self.sampler is None:
            yield None
            return
        yield from self.sampler.batches(self.train_shard.cpu(), epoch)

    def train_loss(self, model: nn.Module, batch: Any) -> Tensor:
        core = getattr(model, "module", model)
        if hasattr(core, "fit_step"):  # boosted trees (registry: differentiable=False): their own fit, no gradient
            return core.fit_step(self.x, self.edge_index, self.train_shard, self.y, self.class_weight,
                                 eta=self.cfg.train.lr, seed=self.cfg.train.seed)
        if batch is None:
            logits = model(self.x, self.edge_index)[self.train_shard]
            target = self.y[self.train_shard]
            # Σ_shard w_y·CE / Σ_train w_y, × world: averaged over the ranks this is exactly the full-batch weighted
            # mean that one process computes (per-shard means would weight the shards unequally)
            loss = nn.functional.cross_entropy(logits.float(), target, weight=self.class_weight, reduction="sum")
            return loss * (self.world / self.train_weight_total)
        nodes = batch.nodes.to(self.device)
        logits = model(self.x[nodes], batch.edge_index.to(self.device))[batch.seed_index.to(self.device)]
        target = self.y[nodes[batch.seed_index.to(self.device)]]
        return nn.functional.cross_entropy(logits.float(), target, weight=self.class_weight)

    # --- evaluation --------------------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> Tensor:
        """Anomaly probability of every node from a full-graph forward pass."""
        return torch.softmax(model(self.x, self.edge_index).float(), -1)[:, 1]

    def evaluate(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        prob = self.scores(model).cpu().numpy()
        y = self.graph.y.numpy()
        out: dict[str, float] = {}
        thr, _ = best_threshold_macro_f1(y[self.idx["val"].numpy()], prob[self.idx["val"].numpy()])
        for name in ("val", "test"):
            ids = self.idx[name].numpy()
            for k, v in binary_metrics(y[ids], prob[ids], thr).items():
                out[f"{name}/{k}"] = float(v)
            pt = torch.as_tensor(np.clip(prob[ids], 1e-7, 1 - 1e-7), dtype=torch.float64)
            yt = torch.as_tensor(y[ids], dtype=torch.float64)
            out[f"{name}/loss"] = float(nn.functional.binary_cross_entropy(pt, yt))
        out["val/threshold"] = float(thr)
        return out

    # --- artifacts ---------------------------------------------------------------------------------------
    def energy_trace(self, model: nn.Module, n: int) -> EnergyTrace | None:
        core = getattr(model, "module", model)
        if not hasattr(core, "forward_with_trace"):
            return None
        with torch.no_grad():
            _, tr = core.forward_with_trace(self.x, self.edge_index)
        return tr

    def flops_per_sample(self) -> float:
        """Analytic forward FLOPs per node of this run's model on this graph."""
        name = self.cfg.model.name
        return registry.flops("graph", name, in_dim=self.graph.num_features, num_nodes=self.graph.num_nodes,
                              num_edges=int(self.graph.edge_index.shape[1]),
                              num_relations=len(self.graph.relations),
                              **registry.options("graph", name, self.cfg.model))

    def write_artifacts(self, model: nn.Module, out: Path) -> list[Path]:
        return []

    def describe(self) -> dict[str, Any]:
        s = self.graph.summary()
        return {**s, "dataset": self.graph.name, "checksum": self.graph.checksum,
                "num_features": self.graph.num_features, "protocol": self.cfg.task.protocol,
                "split_sizes": {k: int(v.numel()) for k, v in self.idx.items()}}
