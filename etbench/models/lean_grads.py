"""Memory-lean closed-form gradients: ``torch.autograd.Function``s that keep only g between forward and backward.

In training, the analytic ∂E/∂g is itself differentiated (first order) by backprop. Left to autograd, every descent
step would keep its (B, N, M) Hopfield activations and (B, H, N, N) attention weights alive until the backward
pass. These Functions save only g and recompute those in backward — the same trade activation checkpointing
makes, but at the level of one gradient map, so each recomputation is a couple of matmuls.

Backward formulas (U = ∂L/∂out, out = ∂E/∂g; per head for attention):

Hopfield, relu:  out = −a ξ,  a = ReLU(g ξᵀ)
    ∂L/∂g = (−U ξᵀ ⊙ 1[h>0]) ξ,   ∂L/∂ξ = −aᵀU + (−U ξᵀ ⊙ 1[h>0])ᵀ g
Hopfield, softmax: out = −p ξ,  p = softmax(β g ξᵀ)
    dp = −U ξᵀ,  dh = β p ⊙ (dp − Σ p dp),  ∂L/∂g = dh ξ,  ∂L/∂ξ = −pᵀU + dhᵀ g,  ∂L/∂β = Σ p ⊙ (dp − Σ p dp) ⊙ h
Attention: out = −(A₁ W^Q + A₂ W^K),  A₁ = ω K,  A₂ = ωᵀ Q,  ω = softmax(β Q Kᵀ) (masked)
    dA₁ = −U W^Qᵀ, dA₂ = −U W^Kᵀ;  dω = dA₁ Kᵀ + Q dA₂ᵀ;  dS = ω ⊙ (dω − Σ_B ω dω)
    dQ = ω dA₂ + β dS K,  dK = ωᵀ dA₁ + β dSᵀ Q;  ∂L/∂W^Q = −A₁ᵀU + dQᵀ g,  ∂L/∂W^K = −A₂ᵀU + dKᵀ g
    ∂L/∂g = dQ W^Q + dK W^K
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from etbench.models.gemm import linear, mm, mm_tn


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class HopfieldReluGrad(torch.autograd.Function):
    """g, ξ → ∂E^HN/∂g = −ReLU(g ξᵀ) ξ, saving only g and ξ.

    Signs are kept on the thin (…, D) side: with r = (U ξᵀ) ⊙ 1[h>0], ∂L/∂g = −r ξ and ∂L/∂ξ = −(aᵀU + rᵀg), so no
    pass over the wide (…, M) activations is spent on a negation.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, xi)
        return mm(linear(g, xi).relu_(), xi).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        g, xi = ctx.saved_tensors
        a = linear(g, xi).relu_()  # a > 0 exactly where h > 0
        r = torch.ops.aten.threshold_backward(linear(u, xi), a, 0)  # (U ξᵀ) ⊙ 1[h > 0]
        dg = mm(r, xi).neg_()
        dxi = (mm_tn(_flat(a), _flat(u)) + mm_tn(_flat(r), _flat(g))).neg_()
        return dg, dxi


class HopfieldSoftmaxGrad(torch.autograd.Function):
    """g, ξ, β → ∂E^HN/∂g = −softmax(β g ξᵀ) ξ, saving only g, ξ, β."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor, beta: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, xi, beta)
        return mm(torch.softmax(beta * linear(g, xi), -1), xi).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        g, xi, beta = ctx.saved_tensors
        h = linear(g, xi)
        p = torch.softmax(beta * h, -1)
        dp = linear(u, xi).neg_()
        core = p * (dp - (p * dp).sum(-1, keepdim=True))
        dh = beta * core
        dg = mm(dh, xi)
        dxi = mm_tn(_flat(dh), _flat(g)) - mm_tn(_flat(p), _flat(u))
        dbeta = (core * h).sum().reshape(beta.shape)
        return dg, dxi, dbeta


def _fused_w(wq: Tensor, wk: Tensor) -> Tensor:
    """[W^Q; W^K] as one (2HY, D) matrix: one projection and one read-out GEMM serve both."""
    h, y, d = wq.shape
    return torch.cat([wq, wk], 0).reshape(2 * h * y, d)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(…, N, 2HY) → contiguous (2, L, H, N, Y) with L the flattened leading dims (one copy)."""
    n, hy2 = t.shape[-2], t.shape[-1]
    return t.reshape(-1, n, 2, heads, hy2 // (2 * heads)).permute(2, 0, 3, 1, 4).contiguous()


def _merge_heads(pair: Tensor, lead: torch.Size) -> Tensor:
    """(2, L, H, N, Y) → (…, N, 2HY), the inverse layout of :func:`_split_heads` (one copy)."""
    _, _, h, n, y = pair.shape
    return pair.permute(1, 3, 0, 2, 4).reshape(*lead, n, 2 * h * y)


def _flat_mask(allowed: Tensor | None, lead: torch.Size, n: int) -> Tensor | None:
    """An admissibility mask (…, 1, N, N) broadcast to the flattened (L, 1, N, N)."""
    if allowed is None:
        return None
    return allowed.expand(*lead, 1, n, n).reshape(-1, 1, n, n)


def _attention_weights(g: Tensor, wqk: Tensor, heads: int, beta: float, allowed: Tensor | None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K (L, H, N, Y) from one fused projection and the masked softmax ω (L, H, C, B); empty rows get ω = 0."""
    qk = _split_heads(linear(g, wqk), heads)
    q, k = qk[0], qk[1]
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(beta)
    if allowed is None:
        return q, k, torch.softmax(s, -1)
    s = s.masked_fill(~allowed, -torch.inf)
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    return q, k, torch.softmax(s, -1).masked_fill(~allowed | empty, 0.0)


def _bmm3(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1])


class AttentionGrad(torch.autograd.Function):
    """g, W^Q, W^K → ∂E^ATT/∂g (dense, optional (…, 1, N, N) admissibility mask), saving only g and the weights.

    Q and K come from one fused (…, N, D) @ (D, 2HY) projection and the read-out is one (…, N, 2HY) @ (2HY, D) GEMM;
    the backward works with the negated dA₁, dA₂, dω, dS, dQ, dK (P = U [W^Q; W^K]ᵀ = −[dA₁, dA₂]) so that every sign
    lands on a thin tensor.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, wq: Tensor, wk: Tensor, beta: float,  # type: ignore[override]
                allowed: Tensor | None) -> Tensor:
        heads, lead, n = wq.shape[0], g.shape[:-2], g.shape[-2]
        wqk = _fused_w(wq, wk)
        q, k, w = _attention_weights(g, wqk, heads, beta, _flat_mask(allowed, lead, n))
        a = torch.stack([torch.matmul(w, k), torch.matmul(w.transpose(-1, -2), q)])  # (2, L, H, N, Y)
        ctx.save_for_backward(g, wq, wk, allowed)
        ctx.beta = beta
        return mm(_merge_heads(a, lead), wqk).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, wq, wk, allowed = ctx.saved_tensors
        beta, heads, lead, n = ctx.beta, wq.shape[0], g.shape[:-2], g.shape[-2]
        wqk = _fused_w(wq, wk)
        q, k, w = _attention_weights(g, wqk, heads, beta, _flat_mask(allowed, lead, n))
        wt = w.transpose(-1, -2)
        a = torch.stack([torch.matmul(w, k), torch.matmul(wt, q)])  # A₁ = ωK, A₂ = ωᵀQ
        p = _split_heads(linear(u, wqk), heads)  # P₁ = −dA₁, P₂ = −dA₂
        p1, p2 = p[0], p[1]
        shape = q.shape
        dw = torch.baddbmm(_bmm3(torch.matmul(p1, k.transpose(-1, -2))), _bmm3(q), _bmm3(p2).transpose(-1, -2))
        dw = dw.view(w.shape)  # −dω
        ds = w * (dw - (w * dw).sum(-1, keepdim=True))  # −dS
        dq = torch.baddbmm(_bmm3(torch.matmul(w, p2)), _bmm3(ds), _bmm3(k), alpha=beta).view(shape)  # −dQ
        dk = torch.baddbmm(_bmm3(torch.matmul(wt, p1)), _bmm3(ds.transpose(-1, -2)), _bmm3(q),
                           alpha=beta).view(shape)  # −dK
        dqk = _merge_heads(torch.stack([dq, dk]), lead)  # −[dQ, dK] as (…, N, 2HY)
        dg = mm(dqk, wqk).neg_()
        dwqk = (mm_tn(_flat(_merge_heads(a, lead)), _flat(u)) + mm_tn(_flat(dqk), _flat(g))).neg_()
        dwq, dwk = dwqk.reshape(2, *wq.shape).unbind(0)
        return dg, dwq, dwk, None, None

