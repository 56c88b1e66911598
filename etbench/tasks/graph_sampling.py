"""Mini-batches of seed nodes with their k-hop neighbourhood, for graphs too large for one full-batch pass.

Each batch is the induced subgraph on the seeds and every node within ``hops`` hops of them (in-neighbours,
PyG's ``source_to_target`` flow: the keys the seeds attend to), built with ``torch_geometric.utils.k_hop_subgraph``
(plain torch, no pyg-lib). The loss is taken on the seeds only. This is an approximation of the full-graph
model: a T-step ET descent sees 2T hops (ωᵀ·Q pulls a node towards the queries that attend to it, whose softmax
is normalised over their own keys), so nodes near the subgraph boundary see a truncated neighbourhood.
``hops=0`` is the authors' GAD subsampling (zhuergou/Energy-Transformer-for-Graph-Anomaly-Detection: ~5% of the
nodes per epoch, induced subgraph on the sampled nodes only).

Batches are deterministic given (seed, epoch). ``neighbor_batches`` offers PyG's ``NeighborLoader`` (sampled
neighbours) where pyg-lib or torch-sparse is installed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch_geometric.typing
from torch import Tensor
from torch_geometric.utils import k_hop_subgraph


@dataclass(frozen=True)
class SubgraphBatch:
    """One mini-batch: ``nodes`` are original node ids (ascending for k-hop batches), ``edge_index`` is relabelled
    to positions in ``nodes``, and ``nodes[seed_index]`` are the seeds, in the order they were given."""

    nodes: Tensor
    edge_index: Tensor
    seed_index: Tensor

    @property
    def seeds(self) -> Tensor:
        return self.nodes[self.seed_index]

    @property
    def num_nodes(self) -> int:
        return int(self.nodes.numel())


def _check_nodes(ids: Tensor, num_nodes: int, what: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
        raise ValueError(f"{what} must be a 1-D int64 tensor of node ids, got "
                         f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
    if ids.numel() == 0:
        raise ValueError(f"{what} is empty")
    if int(ids.min()) < 0 or int(ids.max()) >= num_nodes:
        raise ValueError(f"{what} holds ids in [{int(ids.min())}, {int(ids.max())}], outside [0, {num_nodes})")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{what} holds duplicate node ids")
    return ids


def khop_subgraph(seeds: Tensor, edge_index: Tensor, num_nodes: int, hops: int) -> SubgraphBatch:
    """Induced subgraph on ``seeds`` and all nodes within ``hops`` in-hops of them."""
    if hops < 0:
        raise ValueError(f"hops must be ≥ 0, got {hops}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.dtype != torch.long:
        raise ValueError(f"edge_index must be an int64 tensor of shape (2, E), got {edge_index.dtype} "
                         f"{tuple(edge_index.shape)}")
    _check_nodes(seeds, num_nodes, "seeds")
    nodes, sub_edges, seed_index, _ = k_hop_subgraph(seeds, hops, edge_index, relabel_nodes=True, num_nodes=num_nodes)
    return SubgraphBatch(nodes, sub_edges, seed_index)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator determined by (seed, epoch) alone, so any epoch can be replayed (e.g. on resume)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def batch_size_for(pool_size: int, fraction: float) -> int:
    """Seeds per batch for a ``fraction`` of a pool of ``pool_size`` nodes (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * pool_size))


class KHopSampler:
    """Seed batches drawn from a node pool (e.g. the training nodes), each with its ``hops``-hop induced subgraph.

    ``batch_size`` seeds per batch (or ``fraction`` of the pool); per epoch the pool is permuted with
    ``epoch_generator(seed, epoch)`` and cut into batches, of which the first ``batches_per_epoch`` are returned
    (None: all, covering the pool once). The authors' GAD setting is ``fraction=0.05, batches_per_epoch=1``.
    """

    def __init__(self, edge_index: Tensor, num_nodes: int, *, hops: int = 1, batch_size: int | None = None,
                 fraction: float | None = None, batches_per_epoch: int | None = None, seed: int = 0) -> None:
        if (batch_size is None) == (fraction is None):
            raise ValueError("give exactly one of batch_size (seeds per batch) or fraction (of the pool per batch)")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if fraction is not None:
            batch_size_for(1, fraction)  # validates the range
        if batches_per_epoch is not None and batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be a positive integer or None (all), got {batches_per_epoch}")
        if hops < 0:
            raise ValueError(f"hops must be ≥ 0, got {hops}")
        self.edge_index, self.num_nodes, self.hops = edge_index, num_nodes, hops
        self.batch_size, self.fraction = batch_size, fraction
        self.batches_per_epoch, self.seed = batches_per_epoch, seed

    def seed_batches(self, pool: Tensor, epoch: int, shuffle: bool = True) -> list[Tensor]:
        """The seed ids of each batch of ``epoch``; ``shuffle=False`` keeps pool order (evaluation)."""
        _check_nodes(pool, self.num_nodes, "pool")
        size = self.batch_size if self.batch_size is not None else batch_size_for(pool.numel(), self.fraction or 1.0)
        order = pool[torch.randperm(pool.numel(), generator=epoch_generator(self.seed, epoch))] if shuffle else pool
        chunks = list(order.split(size))
        return chunks if self.batches_per_epoch is None else chunks[: self.batches_per_epoch]

    def batches(self, pool: Tensor, epoch: int, shuffle: bool = True) -> Iterator[SubgraphBatch]:
        for seeds in self.seed_batches(pool, epoch, shuffle):
            yield khop_subgraph(seeds, self.edge_index, self.num_nodes, self.hops)


def has_neighbor_loader() -> bool:
    """Whether PyG's ``NeighborLoader`` can run here (it needs pyg-lib or torch-sparse)."""
    return bool(torch_geometric.typing.WITH_PYG_LIB or torch_geometric.typing.WITH_TORCH_SPARSE)


def neighbor_batches(x: Tensor, edge_index: Tensor, pool: Tensor, num_neighbors: list[int], batch_size: int,
                     seed: int, shuffle: bool = True) -> Iterator[SubgraphBatch]:
    """``NeighborLoader`` batches (sampled, not full, neighbourhoods) as ``SubgraphBatch``; seeds come first.

    The seed order follows a generator seeded with ``seed``; the neighbour draws follow pyg-lib's own RNG.
    """
    if not has_neighbor_loader():
        raise RuntimeError("NeighborLoader needs pyg-lib or torch-sparse, neither is installed; "
                           "use KHopSampler (torch_geometric.utils.k_hop_subgraph) instead")
    from torch_geometric.data import Data
    from torch_geometric.loader import NeighborLoader

    _check_nodes(pool, x.shape[0], "pool")
    loader = NeighborLoader(Data(x=x, edge_index=edge_index, num_nodes=x.shape[0]), num_neighbors=num_neighbors,
                            input_nodes=pool, batch_size=batch_size, shuffle=shuffle,
                            generator=torch.Generator().manual_seed(seed))
    for b in loader:
        yield SubgraphBatch(b.n_id, b.edge_index, torch.arange(b.batch_size))
