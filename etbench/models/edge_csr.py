"""Edge energy attention on CSR matrices: the closed-form gradient of the sparse ET attention without per-edge
(E, H, Y) tensors (SPEC §1.2 restricted to graph edges).

The attention weights of all H heads form one block-diagonal (H·N × H·N) CSR matrix Ω whose row h·N + C holds the
softmax over the keys B of query C (edges B → C). Then

    scores  S = β · sampled(Q Kᵀ)                  (SDDMM: ``torch.sparse.sampled_addmm``, only on the pattern)
    Ω       = row-softmax(S)                        (``torch.segment_reduce`` over contiguous rows)
    A₁ = Ω K,   A₂ = Ωᵀ Q                           (SpMM: ``torch.sparse.mm``; Ωᵀ via a precomputed permutation)

and the backward pass is two more SDDMMs and four SpMMs. Compared with gathering Q_C and K_B per edge this moves
~(E·H·Y) floats a handful of times instead of ~15 times per step, which is what bounds the CPU epoch time.
The gather formulation in ``etbench.models.graph`` stays as the differentiable oracle (``autograd`` mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from etbench.models.energy import project_qk

# CSR tensors are "beta" in torch 2.14; the ops used here (construction, sampled_addmm, sparse.mm) are tested
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass(frozen=True)
class EdgePlan:
    """CSR layout of attention edges (2, E) for ``heads`` heads; built once per graph and reused every step.

    Row r = h·N + C (query C = edge destination), column h·N + B (key B = edge source); nonzeros are stored head
    by head, row by row. ``t_*`` is the transpose (rows = keys) and ``t_perm`` maps its nonzeros to ours.
    """

    n: int
    heads: int
    crow: Tensor
    col: Tensor
    rows: Tensor
    lengths: Tensor
    t_crow: Tensor
    t_col: Tensor
    t_perm: Tensor

    @staticmethod
    def build(edge_index: Tensor, n: int, heads: int) -> EdgePlan:
        src, dst = edge_index
        dev = edge_index.device
        e = int(src.numel())
        order = torch.argsort(dst * n + src)  # CSR order: by query, then key
        src, dst = src[order], dst[order]
        counts = torch.bincount(dst, minlength=n)
        t_order = torch.argsort(src * n + dst)  # transposed CSR order, as positions in our order
        t_counts = torch.bincount(src, minlength=n)
        head = torch.arange(heads, device=dev)
        off = (head * n).repeat_interleave(e)

        def crow_of(c: Tensor) -> Tensor:
            start = torch.zeros(n, dtype=torch.long, device=dev)
            start[1:] = c.cumsum(0)[:-1]
            return torch.cat([(start[None] + (head * e)[:, None]).flatten(), torch.tensor([heads * e], device=dev)])

        return EdgePlan(
            n=n, heads=heads, crow=crow_of(counts), col=src.repeat(heads) + off, rows=dst.repeat(heads) + off,
            lengths=counts.repeat(heads), t_crow=crow_of(t_counts), t_col=dst[t_order].repeat(heads) + off,
            t_perm=t_order.repeat(heads) + (head * e).repeat_interleave(e),
        )

    def csr(self, values: Tensor) -> Tensor:
        """Ω-shaped CSR matrix holding ``values`` (H·E,) in our nonzero order."""
        size = (self.heads * self.n, self.heads * self.n)
        return torch.sparse_csr_tensor(self.crow, self.col, values, size, check_invariants=False)

    def csr_t(self, values: Tensor) -> Tensor:
        """The transpose of ``csr(values)``."""
        size = (self.heads * self.n, self.heads * self.n)
        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_perm], size, check_invariants=False)

    def sddmm(self, a: Tensor, b: Tensor) -> Tensor:
        """(a bᵀ) sampled on the pattern: per nonzero (r, c), a[r]·b[c]; a, b (H·N, k) → (H·E,)."""
        pattern = self.csr(a.new_zeros(self.col.numel()))
        return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()

    def row_sum(self, values: Tensor) -> Tensor:
        return torch.segment_reduce(values, "sum", lengths=self.lengths, unsafe=True)

    def softmax(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Row softmax of scores s (H·E,) and each row's logsumexp (H·N,); a row without keys has logsumexp 0."""
        m = torch.segment_reduce(s.detach(), "max", lengths=self.lengths, unsafe=True)
        m = torch.where(self.lengths > 0, m, torch.zeros_like(m))
        p = torch.exp(s - m[self.rows])
        z = self.row_sum(p)
        z = torch.where(z > 0, z, torch.ones_like(z))
        return p / z[self.rows], m + torch.log(z)


def _heads_first(x: Tensor) -> Tensor:
    """(N, H, Y) → (H·N, Y), head-major rows (the CSR row order)."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _nodes_first(x: Tensor, h: int) -> Tensor:
    """(H·N, Y) → (N, H, Y)."""
    return x.reshape(h, -1, x.shape[-1]).transpose(0, 1)


def csr_forward(plan: EdgePlan, g: Tensor, wq: Tensor, wk: Tensor, beta: float
                ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(∂E^ATT/∂g (N, D), E^ATT 0-d, intermediates (Q, K, ω, A₁, A₂) for the backward)."""
    h = wq.shape[0]
    q, k = (t.reshape(-1, wq.shape[1]) for t in project_qk(g, wq, wk))  # (H·N, Y), head-major rows
    w, lse = plan.softmax(beta * plan.sddmm(q, k))
    a1 = torch.sparse.mm(plan.csr(w), k)  # Σ_B ω[C,B] K_B, at the query
    a2 = torch.sparse.mm(plan.csr_t(w), q)  # Σ_C ω[C,B] Q_C, at the key
    w_all = torch.cat([wq, wk], 0).reshape(-1, wq.shape[-1])  # (2·H·Y, D)
    out = -(torch.cat([_nodes_first(a1, h), _nodes_first(a2, h)], 1).flatten(1) @ w_all)
    return out, -lse.sum() / beta, (q, k, w, a1, a2)


class CSRAttentionGrad(torch.autograd.Function):
    """g, W^Q, W^K → (∂E^ATT/∂g, E^ATT) on an ``EdgePlan``, saving only g (the rest is recomputed in backward).

    Same backward as ``etbench.models.graph.SparseAttentionGrad`` (see there for the formulas), with the per-edge
    gathers replaced by SDDMMs (dω = dA₁·K + Q·dA₂ on the pattern) and the scatters by SpMMs:
    dQ = Ω dA₂ + β dS K,  dK = Ωᵀ dA₁ + β dSᵀ Q.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, wq: Tensor, wk: Tensor, beta: float,  # type: ignore[override]
                plan: EdgePlan) -> tuple[Tensor, Tensor]:
        out, energy, _ = csr_forward(plan, g, wq, wk, beta)
        ctx.save_for_backward(g, wq, wk)
        ctx.beta, ctx.plan = beta, plan
        ctx.mark_non_differentiable(energy)
        return out, energy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor, _u_energy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, wq, wk = ctx.saved_tensors
        beta, plan = ctx.beta, ctx.plan
        h = wq.shape[0]
        _, _, (q, k, w, a1, a2) = csr_forward(plan, g, wq, wk, beta)
        da1 = -_heads_first(torch.einsum("nd,hyd->nhy", u, wq))
        da2 = -_heads_first(torch.einsum("nd,hyd->nhy", u, wk))
        dw = plan.sddmm(torch.cat([da1, q], 1), torch.cat([k, da2], 1))  # dA₁[C]·K_B + Q_C·dA₂[B]
        ds = beta * w * (dw - plan.row_sum(w * dw)[plan.rows])
        dq = torch.sparse.mm(plan.csr(w), da2) + torch.sparse.mm(plan.csr(ds), k)
        dk = torch.sparse.mm(plan.csr_t(w), da1) + torch.sparse.mm(plan.csr_t(ds), q)
        dq, dk = _nodes_first(dq, h), _nodes_first(dk, h)
        a1, a2 = _nodes_first(a1, h), _nodes_first(a2, h)
        dg = torch.einsum("nhy,hyd->nd", dq, wq) + torch.einsum("nhy,hyd->nd", dk, wk)
        dwq = torch.einsum("nhy,nd->hyd", dq, g) - torch.einsum("nhy,nd->hyd", a1, u)
        dwk = torch.einsum("nhy,nd->hyd", dk, g) - torch.einsum("nhy,nd->hyd", a2, u)
        return dg, dwq, dwk, None, None
