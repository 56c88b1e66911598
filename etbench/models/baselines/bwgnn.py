"""BWGNN: Beta-wavelet graph neural network for node anomaly detection.

Written from the equations of Tang, Li, Sun, Zhang, "Rethinking Graph Neural Networks for Anomaly Detection"
(ICML 2022). With the symmetric normalised Laplacian L = I − D^{-1/2} A D^{-1/2} (spectrum in [0, 2]) and order C,
filter i = 0..C is the Beta wavelet

    W_i = β_i(L/2),   β_i(w) = w^i (1 − w)^{C−i} / (2 B(i+1, C+1−i)),

a band-pass filter whose pass band moves from low (i = 0) to high (i = C) frequencies. Since
1 / B(i+1, C+1−i) = (C+1) binom(C, i), the binomial theorem gives the identity Σ_i β_i(w) = (C+1)/2 for all w,
i.e. Σ_i W_i = (C+1)/2 · I (checked in the tests).

Each filter is a polynomial in L, applied with C sparse propagations shared by the whole bank (no eigendecomposition).
Network: MLP encoder (Linear, ReLU, Linear, ReLU) → filter bank → concatenate the C+1 outputs → Linear + ReLU →
Linear to class logits. The heterogeneous variant runs the filter bank and the Linear + ReLU on every relation with
shared weights and combines the per-relation node representations by an element-wise **maximum** (max pooling over
relations), which is how we read the paper's heterogeneous BWGNN.
"""

from __future__ import annotations

from math import comb
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.utils import get_laplacian, scatter, to_torch_csr_tensor

BWGNN_MODES = ("homo", "hetero")


def beta_wavelet_coefficients(order: int) -> np.ndarray:
    """Coefficients P (C+1, C+1), float64: filter i equals Σ_k P[i, k] L^k.

    Expands c_i w^i (1 − w)^{C−i} with c_i = (C+1) binom(C, i) / 2 and substitutes w = L/2.
    """
    if order < 1:
        raise ValueError(f"BWGNN order C must be a positive integer, got {order}")
    coef = np.zeros((order + 1, order + 1), dtype=np.float64)
    for i in range(order + 1):
        c_i = (order + 1) * comb(order, i) / 2.0
        for j in range(order - i + 1):  # (1 − w)^{C−i} = Σ_j binom(C−i, j) (−w)^j
            k = i + j
            coef[i, k] = c_i * comb(order - i, j) * (-1) ** j / 2.0**k
    return coef


def laplacian_operator(edge_index: Tensor, num_nodes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sparse entries (index (2, E+N), weight (E+N,)) of L = I − D^{-1/2} A D^{-1/2}; isolated nodes get L_ii = 1."""
    weight = torch.ones(edge_index.size(1), dtype=dtype, device=edge_index.device)
    return get_laplacian(edge_index, weight, normalization="sym", num_nodes=num_nodes)


def apply_sparse(index: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """(M X)_r = Σ_c M_rc X_c for the sparse matrix M given by (index = [row; col], weight)."""
    row, col = index
    return scatter(weight.unsqueeze(-1) * x[col], row, dim=0, dim_size=x.size(0), reduce="sum")


def sparse_operator(index: Tensor, weight: Tensor, n: int) -> Tensor:
    """The CSR (n, n) matrix with entries ``weight`` at (row, col) = ``index``: ``torch.sparse.mm(M, X)`` equals
    ``apply_sparse(index, weight, X)`` with one sparse-dense matmul instead of a per-edge gather and scatter."""
    return to_torch_csr_tensor(index, weight, size=(n, n))


def beta_wavelet_filter_bank(x: Tensor, edge_index: Tensor, order: int, coef: Tensor | None = None) -> Tensor:
    """Stack (C+1, N, F) of β_i(L/2) X for i = 0..C, using C sparse Laplacian propagations."""
    p = coef if coef is not None else torch.as_tensor(beta_wavelet_coefficients(order))
    p = p.to(dtype=x.dtype, device=x.device)
    lap = sparse_operator(*laplacian_operator(edge_index, x.size(0), x.dtype), x.size(0))
    powers = [x]
    for _ in range(order):
        powers.append(torch.sparse.mm(lap, powers[-1]))
    return torch.einsum("ik,knf->inf", p, torch.stack(powers))


def check_node_inputs(x: Tensor, edge_index: Tensor, in_dim: int, what: str) -> None:
    """Raise a ValueError naming `what` when x is not (N, in_dim) or edge_index is not int64 (2, E)."""
    if x.dim() != 2 or x.size(1) != in_dim:
        raise ValueError(f"{what}: node features must have shape (N, {in_dim}), got {tuple(x.shape)}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.dtype != torch.long:
        raise ValueError(
            f"{what}: edge_index must be an int64 tensor of shape (2, E), "
            f"got {edge_index.dtype} {tuple(edge_index.shape)}"
        )


class BWGNN(nn.Module):
    """Beta-wavelet GNN (homogeneous or heterogeneous), returning logits (N, num_classes)."""

    def __init__(
        self,
        in_dim: int,
        hidden: int = 64,
        num_classes: int = 2,
        order: int = 2,
        mode: Literal["homo", "hetero"] = "homo",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in BWGNN_MODES:
            raise ValueError(f"bwgnn_mode must be one of {BWGNN_MODES}, got {mode!r}")
        self.in_dim, self.order, self.mode = in_dim, order, mode
        self.register_buffer("coef", torch.as_tensor(beta_wavelet_coefficients(order)), persistent=False)
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.mix = nn.Sequential(nn.Linear((order + 1) * hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, num_classes)

    def _bank(self, h: Tensor, edge_index: Tensor) -> Tensor:
        bank = beta_wavelet_filter_bank(h, edge_index, self.order, self.coef)  # (C+1, N, hidden)
        return self.mix(torch.cat(list(bank), dim=-1))

    def forward(self, x: Tensor, edge_index: Tensor, relations: dict[str, Tensor] | None = None) -> Tensor:
        check_node_inputs(x, edge_index, self.in_dim, "BWGNN")
        h = self.encoder(x)
        if self.mode == "homo" or relations is None:
            return self.head(self._bank(h, edge_index))
        if not relations:
            raise ValueError("BWGNN(hetero): relations is an empty dict; pass None to use edge_index instead")
        per_relation = []
        for name, rel_index in relations.items():
            check_node_inputs(x, rel_index, self.in_dim, f"BWGNN relation {name!r}")
            per_relation.append(self._bank(h, rel_index))
        return self.head(torch.stack(per_relation).amax(dim=0))


def bwgnn_flops(
    in_dim: int, hidden: int, num_classes: int, order: int, num_nodes: int, num_edges: int, num_relations: int = 1
) -> float:
    """Analytic forward FLOPs of the whole graph (2 per multiply-add; bias/activation ignored).

    num_edges counts directed edges over all relations; each relation's Laplacian also has N diagonal entries.
    """
    n, h, c = num_nodes, hidden, order
    enc = n * (2 * in_dim * h + 2 * h * h)
    nonzero_terms = (c + 1) * (c + 2) // 2  # coefficients P[i, k] with k ≥ i
    per_relation_nodes = n * (nonzero_terms * 2 * h + 2 * (c + 1) * h * h)
    propagation = c * 2 * h * (num_edges + num_relations * n)
    pooling = (num_relations - 1) * n * h
    head = n * 2 * h * num_classes
    return float(enc + num_relations * per_relation_nodes + propagation + pooling + head)
