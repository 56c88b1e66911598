"""Edge energy attention on CSR matrices: the closed-form gradient of the sparse ET attention without per-edge
(E, H, Y) tensors (SPEC §1.2 restricted to graph edges).

The attention of all H heads is one block-diagonal (H·N × H·N) CSR pattern whose row h·N + C holds the keys B of
query C (edges B → C). Per step, with P the unnormalised weights and z their row sums (Ω = diag(1/z) P):

    S  = β · sampled(Q Kᵀ)                   (SDDMM: ``torch.sparse.sampled_addmm``, in place, only on the pattern)
    P  = exp(S − max S)                      (one shift; per row, by ``torch.segment_reduce``, where a row needs it)
    [P K, z] = P [K, 1]                       (SpMM: ``torch.sparse.mm``; the row sums z ride along as a column)
    A₁ = Ω K = (P K) / z,   A₂ = Ωᵀ Q = Pᵀ (Q / z)    (Pᵀ: the values through a stored permutation)

Ω itself is never formed: 1/z scales the thin (H·N, Y) operands instead of the H·E weights. The backward
(``CSRAttentionGrad``) keeps P and Pᵀ from the forward and needs one more SDDMM and four SpMMs; the softmax's
row term Σ_B ω dω is read off node-level tensors (see there), so no per-edge gather of a row quantity is needed.
Indices are int32 (MKL's sparse kernels take them without a conversion copy per call). The gather formulation in
``etbench.models.graph`` stays as the differentiable oracle (``autograd`` mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from etbench.models.energy import project_qk

# CSR tensors are "beta" in torch 2.14; the ops used here (construction, sampled_addmm, sparse mm) are tested
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass(frozen=True)
class EdgePlan:
    """CSR layout of attention edges (2, E) for ``heads`` heads; built once per graph and reused every step.

    Row r = h·N + C (query C = edge destination), column h·N + B (key B = edge source); nonzeros are stored head
    by head, row by row. ``rows`` is each nonzero's row; ``t_*`` is the transpose (rows = keys) and ``t_perm``
    maps its nonzeros to ours (``transpose_values``). All index tensors but ``lengths`` are int32 below 2³¹
    nonzeros (MKL takes them without a conversion copy per call; gathers read half the bytes).
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
        itype = torch.int32 if heads * max(e, n) < 2**31 - 1 else torch.long

        def crow_of(c: Tensor) -> Tensor:
            start = torch.zeros(n, dtype=torch.long, device=dev)
            start[1:] = c.cumsum(0)[:-1]
            crow = torch.cat([(start[None] + (head * e)[:, None]).flatten(), torch.tensor([heads * e], device=dev)])
            return crow.to(itype)

        return EdgePlan(
            n=n, heads=heads, crow=crow_of(counts), col=(src.repeat(heads) + off).to(itype),
            rows=(dst.repeat(heads) + off).to(itype), lengths=counts.repeat(heads), t_crow=crow_of(t_counts),
            t_col=(dst[t_order].repeat(heads) + off).to(itype),
            t_perm=(t_order.repeat(heads) + (head * e).repeat_interleave(e)).to(itype),
        )

    @property
    def size(self) -> tuple[int, int]:
        return self.heads * self.n, self.heads * self.n

    def csr(self, values: Tensor) -> Tensor:
        """Ω-shaped CSR matrix holding ``values`` (H·E,) in our nonzero order."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.size, check_invariants=False)

    def transpose_values(self, values: Tensor) -> Tensor:
        """``values`` (H·E,) in the nonzero order of the transpose."""
        return values.index_select(0, self.t_perm)

    def csr_t(self, values_t: Tensor) -> Tensor:
        """The transposed CSR matrix holding ``values_t`` (already in its order: ``transpose_values``)."""
        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values_t, self.size, check_invariants=False)

    def sddmm(self, a: Tensor, b: Tensor) -> Tensor:
        """(a bᵀ) sampled on the pattern: per nonzero (r, c), a[r]·b[c]; a, b (H·N, k) → (H·E,). Written in place
        into a fresh zeroed buffer (no copy of the pattern's indices and values per call)."""
        pattern = self.csr(a.new_zeros(self.col.numel()))
        return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0, out=pattern).values()

    def row_max(self, values: Tensor) -> Tensor:
        """Each row's max (H·N,); 0 for a row without nonzeros."""
        m = torch.segment_reduce(values, "max", lengths=self.lengths, unsafe=True)
        return torch.where(self.lengths > 0, m, torch.zeros_like(m))


def _heads_first(x: Tensor) -> Tensor:
    """(N, H, Y) → (H·N, Y), head-major rows (the CSR row order)."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _nodes_first(x: Tensor, h: int) -> Tensor:
    """(H·N, Y) → (N, H, Y)."""
    return x.reshape(h, -1, x.shape[-1]).transpose(0, 1)


def _fused_w(wq: Tensor, wk: Tensor) -> Tensor:
    """[W^Q; W^K] as one (2HY, D) matrix."""
    return torch.cat([wq, wk], 0).reshape(-1, wq.shape[-1])


def _pair_nodes_first(a: Tensor, b: Tensor, h: int) -> Tensor:
    """Two (H·N, Y) head-major tensors → (N, 2HY) node rows [a_1 … a_H, b_1 … b_H] (the W^Q; W^K column order)."""
    return torch.cat([_nodes_first(a, h), _nodes_first(b, h)], 1).flatten(1)


# the smallest row sum of exp(S − max S) (one shift for the whole graph) that keeps every row exact to rounding:
# terms lost to underflow are then below the dtype's epsilon relative to their row, and 1/z stays far from overflow
GLOBAL_SHIFT_MIN_ROW_SUM = {torch.float32: 1e-20, torch.float64: 1e-200}


def _weights(plan: EdgePlan, q: Tensor, k: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(P (H·E,), the shift m per row (H·N,), [P K, z] (H·N, Y + 1)) for the scores S = β Q Kᵀ on the pattern.

    Softmax and logsumexp do not depend on the shift, which only keeps exp in range. One shift for all rows, the
    largest score, costs a scalar subtraction; when some row with keys then sums below ``GLOBAL_SHIFT_MIN_ROW_SUM``
    (its scores lie far below the largest one) the weights are recomputed with each row's own max (a segment max
    and a per-nonzero gather), so every row is exact either way.
    """
    k1 = torch.cat([k, k.new_ones(k.shape[0], 1)], 1)  # [K, 1]: the row sums z ride along in the SpMM
    tiny = GLOBAL_SHIFT_MIN_ROW_SUM.get(q.dtype)
    s = plan.sddmm(q * beta, k)  # scores β Q_C·K_B
    if tiny is not None and s.numel():
        top = s.max()
        p = s.sub_(top).exp_()
        a1z = torch.sparse.mm(plan.csr(p), k1)
        if not bool(((a1z[:, -1] < tiny) & (plan.lengths > 0)).any()):
            return p, torch.where(plan.lengths > 0, top, torch.zeros_like(top)), a1z  # rows without keys: 0
        s = plan.sddmm(q * beta, k)
    m = plan.row_max(s)
    p = s.sub_(m.index_select(0, plan.rows)).exp_()  # P = exp(S − rowmax), in place
    return p, m, torch.sparse.mm(plan.csr(p), k1)


def csr_forward(plan: EdgePlan, g: Tensor, wq: Tensor, wk: Tensor, beta: float
                ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(∂E^ATT/∂g (N, D), E^ATT 0-d, intermediates (Q, K, P, Pᵀ values, 1/z, A₁, A₂) for the backward)."""
    h, y = wq.shape[0], wq.shape[1]
    q, k = (t.reshape(-1, y) for t in project_qk(g, wq, wk))  # (H·N, Y), head-major rows
    p, m, a1z = _weights(plan, q, k, beta)
    z = a1z[:, y]
    z = torch.where(z > 0, z, torch.ones_like(z))  # a row without keys: z = 1, logsumexp 0, no ω
    inv_z, lse = z.reciprocal(), m + torch.log(z)
    a1 = a1z[:, :y].mul_(inv_z[:, None])  # Σ_B ω[C,B] K_B, at the query
    p_t = plan.transpose_values(p)
    a2 = torch.sparse.mm(plan.csr_t(p_t), q * inv_z[:, None])  # Σ_C ω[C,B] Q_C, at the key
    out = torch.mm(_pair_nodes_first(a1, a2, h), _fused_w(wq, wk)).neg_()
    return out, -lse.sum() / beta, (q, k, p, p_t, inv_z, a1, a2)


class CSRAttentionGrad(torch.autograd.Function):
    """g, W^Q, W^K → (∂E^ATT/∂g, E^ATT) on an ``EdgePlan``, keeping P and Pᵀ (H·E each) and the thin node tensors.

    Backward (U = ∂L/∂out; ω = P/z; dA₁ = −U W^Qᵀ, dA₂ = −U W^Kᵀ per head), the formulas of
    ``lean_grads.AttentionGrad`` restricted to the pattern:

        dω = dA₁ Kᵀ + Q dA₂ᵀ (one SDDMM of width 2Y),   r_C = Σ_B ω_CB dω_CB = dA₁_C·A₁_C + Q_C·(Ω dA₂)_C
        dQ = Ω dA₂ + β (Ω⊙dω) K − β r ⊙ A₁ = [P dA₂ + β (P⊙dω) K] / z − β r ⊙ A₁
        dK = Ωᵀ dA₁ + β (Ω⊙dω)ᵀ Q − β Ωᵀ (r ⊙ Q) = Pᵀ [(dA₁ − β r ⊙ Q) / z] + β (P⊙dω)ᵀ (Q / z)
        ∂L/∂g = dQ W^Q + dK W^K,  ∂L/∂W^Q = dQᵀ g − A₁ᵀ U,  ∂L/∂W^K = dKᵀ g − A₂ᵀ U

    so the row term r of the softmax backward never has to be spread over the edges.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, wq: Tensor, wk: Tensor, beta: float,  # type: ignore[override]
                plan: EdgePlan) -> tuple[Tensor, Tensor]:
        out, energy, saved = csr_forward(plan, g, wq, wk, beta)
        ctx.save_for_backward(g, wq, wk, *saved)
        ctx.beta, ctx.plan = beta, plan
        ctx.mark_non_differentiable(energy)
        return out, energy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor, _u_energy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, wq, wk, q, k, p, p_t, inv_z, a1, a2 = ctx.saved_tensors
        beta, plan = ctx.beta, ctx.plan
        h, y = wq.shape[0], wq.shape[1]
        w_all = _fused_w(wq, wk)
        da = torch.mm(u, w_all.T).neg_().view(-1, 2, h, y)  # (N, 2, H, Y): [dA₁, dA₂] per node
        da1, da2 = _heads_first(da[:, 0]), _heads_first(da[:, 1])
        pdw = plan.sddmm(torch.cat([da1, q], 1), torch.cat([k, da2], 1)).mul_(p)  # P ⊙ dω
        x = torch.sparse.mm(plan.csr(p), da2)  # P dA₂ = z · Ω dA₂
        z1 = inv_z[:, None]
        r = (da1 * a1).sum(-1) + (q * x).sum(-1) * inv_z  # Σ_B ω dω per row
        br = (beta * r)[:, None]
        dq = torch.sparse.mm(plan.csr(pdw), k).mul_(beta).add_(x).mul_(z1).sub_(br * a1)
        dk = torch.sparse.mm(plan.csr_t(p_t), (da1 - br * q).mul_(z1))
        dk.add_(torch.sparse.mm(plan.csr_t(plan.transpose_values(pdw)), q * z1), alpha=beta)
        dqk = _pair_nodes_first(dq, dk, h)  # (N, 2HY)
        dg = torch.mm(dqk, w_all)
        dw_all = torch.mm(dqk.T, g).sub_(torch.mm(_pair_nodes_first(a1, a2, h).T, u))
        dwq, dwk = dw_all.reshape(2, *wq.shape).unbind(0)
        return dg, dwq, dwk, None, None
