"""Graph classification on one fold as the training loop sees it (SPEC §5).

One fold of ``etbench.tasks.graphcls_folds`` (protocol, repeat, fold): mini-batches of training graphs (shuffled per
epoch, sharded over workers), cross-entropy with label smoothing (SPEC: 0.05), and after every epoch the accuracy
and plain cross-entropy (no smoothing) on the training graphs (eval mode), the inner validation holdout and the outer
test fold: ``train/acc``, ``val/acc``, ``val/loss``, ``test/acc``, ``test/loss`` (the loop adds the smoothed training
loss as ``train/loss``). The best epoch is the one with the highest ``val/acc``; under ``authors`` (no holdout,
test ⊂ train: training accuracy) it is the last epoch.

Positional encodings: the k smallest non-trivial eigenvectors of the symmetric normalised Laplacian
I − D^{-1/2} A D^{-1/2} (torch_geometric's ``AddLaplacianEigenvectorPE``: dense ``eigh`` below 100 nodes, ``eigsh``
above), the first (eigenvalue 0) dropped, zero-padded to k columns for graphs with ≤ k nodes, computed once per
dataset with a fixed seed for the transform's own random signs. The ET flips the signs at random in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import AddLaplacianEigenvectorPE

from etbench.config import GraphClsTaskConfig, RunConfig
from etbench.data.paths import resolve_data_path
from etbench.data.tudataset import GraphClsDataset, load_tu_dataset
from etbench.models import registry
from etbench.models.energy import EnergyTrace
from etbench.tasks.graphcls_folds import GraphFold, make_folds

EVAL_BATCH = 256  # graphs per evaluation forward
PE_SEED = 0  # the transform's random signs; any fixed value (eigenvectors are defined up to sign)


def laplacian_pe(graph: Data, k: int) -> Tensor:
    """(n, k) float32: the k smallest non-trivial eigenvectors of the graph's normalised Laplacian, zero-padded."""
    n = int(graph.num_nodes)
    out = torch.zeros(n, k)
    if k == 0 or n < 2:
        return out
    m = min(k, n - 1)  # a graph of n nodes has n − 1 non-trivial eigenvectors
    # from 100 nodes PyG calls ARPACK (scipy's eigsh), whose default start vector is random and not seeded by torch
    # or numpy: the same graph's PE then differed between processes (eigenvector signs, and ~1e-5 in value), so an
    # identical run did not reproduce. A start vector from the graph's size makes it deterministic.
    v0 = np.random.default_rng([PE_SEED, n]).standard_normal(n)
    pe = AddLaplacianEigenvectorPE(m, attr_name="pe", is_undirected=True, v0=v0)(
        Data(edge_index=graph.edge_index, num_nodes=n)).pe
    out[:, :m] = pe.float()
    return out


def add_laplacian_pe(graphs: list[Data], k: int) -> list[Data]:
    """Copies of ``graphs`` with ``pe`` (n, k) attached (see ``laplacian_pe``), reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PE_SEED)
        out = []
        for g in graphs:
            h = g.clone()
            h.pe = laplacian_pe(g, k)
            out.append(h)
    return out


def select_fold(ds: GraphClsDataset, task: GraphClsTaskConfig) -> GraphFold:
    """The fold ``task.fold`` of repetition ``task.repeat`` of ``task.protocol`` (fold seed ``task.fold_seed``)."""
    folds = make_folds(task.protocol, ds.y, seed=task.fold_seed, repeats=task.repeat + 1,
                       splits=ds.stored_folds, val_fraction=task.val_fraction)
    chosen = [f for f in folds if (f.repeat, f.fold) == (task.repeat, task.fold)]
    if not chosen:
        have = sorted({f.fold for f in folds})
        raise ValueError(f"task.fold {task.fold} / task.repeat {task.repeat} does not exist for protocol "
                         f"{task.protocol!r} on {ds.info.name}: folds {have[0]}..{have[-1]}"
                         + (" (stored folds have one repeat)" if task.protocol == "stored" else ""))
    return chosen[0]


class GraphClsTask:
    """One fold's graphs (with PE), batches, loss and metrics; ``rank``/``world`` shard training and evaluation."""

    best_mode = "max"

    def __init__(self, cfg: RunConfig, ds: GraphClsDataset, device: torch.device, rank: int = 0, world: int = 1,
                 input_dtype: torch.dtype = torch.float32) -> None:
        assert isinstance(cfg.task, GraphClsTaskConfig)
        self.cfg, self.ds, self.device, self.rank, self.world = cfg, ds, device, rank, world
        self.input_dtype = input_dtype
        self.fold = select_fold(ds, cfg.task)
        self.best_metric = "epoch" if self.fold.training_accuracy else "val/acc"
        self.graphs = add_laplacian_pe(ds.graphs, cfg.task.pe_dim)
        per_worker = cfg.train.batch_size // (world * cfg.dist.grad_accum)
        if per_worker < 1:
            raise ValueError(f"train.batch_size {cfg.train.batch_size} is smaller than workers × grad_accum "
                             f"({world} × {cfg.dist.grad_accum})")
        self.micro_batch = per_worker
        self.samples_per_epoch = -(-self.fold.train.size // world)  # every rank the same (padded, see _shard)
        self._eval: dict[str, list[Batch]] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1,
                    input_dtype: torch.dtype = torch.float32) -> GraphClsTask:
        assert isinstance(cfg.task, GraphClsTaskConfig)
        t = cfg.task
        ds = load_tu_dataset(t.dataset, resolve_data_path(t.path), node_attributes=t.node_attributes)
        return cls(cfg, ds, device, rank, world, input_dtype)

    # --- batches ----------------------------------------------------------------------------------------------
    def _collate(self, idx: np.ndarray) -> Batch:
        b = Batch.from_data_list([self.graphs[int(i)] for i in idx])
        return b.to(self.device)

    def _logits(self, model: nn.Module, b: Batch) -> Tensor:
        x, pe = b.x.to(self.input_dtype), b.pe.to(self.input_dtype)
        return model(x, b.edge_index, b.batch, b.num_graphs, pe=pe)

    def _shard(self, epoch: int) -> np.ndarray:
        """This rank's training graphs for ``epoch``: one shuffle for all ranks, padded by wrapping around (as
        torch's ``DistributedSampler``) so every rank takes the same number of steps."""
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(self.fold.train)
        order = np.resize(order, self.samples_per_epoch * self.world)
        return order[self.rank::self.world]

    def num_train_batches(self) -> int:
        return -(-self.samples_per_epoch // self.micro_batch)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        shard = self._shard(epoch)
        for start in range(0, shard.size, self.micro_batch):
            yield self._collate(shard[start:start + self.micro_batch])

    def train_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(self._logits(model, batch).float(), batch.y,
                                           label_smoothing=self.cfg.task.label_smoothing)

    # --- evaluation --------------------------------------------------------------------------------------------
    def _eval_batches(self, split: str) -> list[Batch]:
        """This rank's graphs of ``split`` in as many batches as every other rank (ranks forward in step)."""
        if split not in self._eval:
            every = getattr(self.fold, split)
            if every.size == 0:  # no inner holdout ('authors'): the split is empty on every rank, its metrics NaN
                self._eval[split] = []
                return self._eval[split]
            idx = every[self.rank::self.world]
            largest = math.ceil(every.size / self.world)  # the largest rank's share
            chunks = np.array_split(idx, math.ceil(largest / EVAL_BATCH))
            self._eval[split] = [self._collate(c) for c in chunks if c.size]
        return self._eval[split]

    def evaluate(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Accuracy and cross-entropy per split, summed over workers by ``reduce`` (NaN for an empty split)."""
        out: dict[str, float] = {}
        for split in ("train", "val", "test"):
            tot = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, Σ loss, graphs
            for b in self._eval_batches(split):
                logits = self._logits(model, b).float()
                tot[0] += (logits.argmax(-1) == b.y).sum()
                tot[1] += nn.functional.cross_entropy(logits, b.y, reduction="sum").double()
                tot[2] += b.num_graphs
            correct, loss, n = (float(v) for v in reduce(tot).cpu())
            out[f"{split}/acc"] = correct / n if n else float("nan")
            if split != "train":  # the loop reports the training loss itself
                out[f"{split}/loss"] = loss / n if n else float("nan")
        return out

    # --- artifacts and description -----------------------------------------------------------------------------
    def energy_trace(self, model: nn.Module, n: int) -> EnergyTrace | None:
        """Per-graph energies of the first ``n`` validation graphs (test graphs under ``authors``)."""
        core = getattr(model, "module", model)
        if not hasattr(core, "forward_with_trace"):
            return None
        idx = (self.fold.val if self.fold.val.size else self.fold.test)[:n]
        b = self._collate(idx)
        with torch.no_grad():
            _, tr = core.forward_with_trace(b.x.to(self.input_dtype), b.edge_index, b.batch, b.num_graphs,
                                            pe=b.pe.to(self.input_dtype))
        return tr

    def mean_size(self) -> tuple[float, float]:
        """Mean nodes and directed edges per graph of the dataset."""
        info = self.ds.info
        return info.num_nodes / info.num_graphs, 2 * info.num_edges / info.num_graphs

    def flops_per_sample(self) -> float:
        """Analytic forward FLOPs per graph of this run's model at the dataset's mean graph size."""
        name, (n, e), info = self.cfg.model.name, self.mean_size(), self.ds.info
        return registry.flops("graphcls", name, in_dim=info.num_node_features, num_classes=info.num_classes,
                              pe_dim=self.cfg.task.pe_dim, num_nodes=n, num_edges=e,
                              **registry.options("graphcls", name, self.cfg.model))

    def write_artifacts(self, model: nn.Module, out: Path) -> list[Path]:
        return []

    def describe(self) -> dict[str, Any]:
        f = self.fold
        return {**self.ds.info.summary(), "dataset": self.ds.info.name, "num_features": self.ds.info.num_node_features,
                "protocol": f.protocol, "repeat": f.repeat, "fold": f.fold, "fold_seed": f.seed,
                "training_accuracy": f.training_accuracy, "split_sizes": f.sizes(), "pe_dim": self.cfg.task.pe_dim,
                # the graphs of each part, recorded in summary.json so a run's protocol can be audited afterwards
                "fold_indices": {part: getattr(f, part).tolist() for part in ("train", "val", "test")}}
