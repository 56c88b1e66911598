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


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class HopfieldReluGrad(torch.autograd.Function):
    """g, ξ → ∂E^HN/∂g = −ReLU(g ξᵀ) ξ, saving only g and ξ."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, xi)
        return -(torch.relu(g @ xi.T) @ xi)

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        g, xi = ctx.saved_tensors
        h = g @ xi.T
        a = torch.relu(h)
        dh = -(u @ xi.T) * (h > 0)
        dg = dh @ xi
        dxi = -(_flat(a).T @ _flat(u)) + _flat(dh).T @ _flat(g)
        return dg, dxi


class HopfieldSoftmaxGrad(torch.autograd.Function):
    """g, ξ, β → ∂E^HN/∂g = −softmax(β g ξᵀ) ξ, saving only g, ξ, β."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor, beta: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, xi, beta)
        return -(torch.softmax(beta * (g @ xi.T), -1) @ xi)

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        g, xi, beta = ctx.saved_tensors
        h = g @ xi.T
        p = torch.softmax(beta * h, -1)
        dp = -(u @ xi.T)
        core = p * (dp - (p * dp).sum(-1, keepdim=True))
        dh = beta * core
        dg = dh @ xi
        dxi = -(_flat(p).T @ _flat(u)) + _flat(dh).T @ _flat(g)
        dbeta = (core * h).sum().reshape(beta.shape)
        return dg, dxi, dbeta


def _attention_weights(g: Tensor, wq: Tensor, wk: Tensor, beta: float, allowed: Tensor | None,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K (…, H, N, Y) and masked softmax ω (…, H, C, B); empty query rows get ω = 0."""
    q = torch.einsum("...nd,hyd->...hny", g, wq)
    k = torch.einsum("...nd,hyd->...hny", g, wk)
    s = beta * (q @ k.transpose(-1, -2))
    if allowed is None:
        return q, k, torch.softmax(s, -1)
    s = s.masked_fill(~allowed, -torch.inf)
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    return q, k, torch.softmax(s, -1).masked_fill(~allowed | empty, 0.0)


class AttentionGrad(torch.autograd.Function):
    """g, W^Q, W^K → ∂E^ATT/∂g (dense, optional (…, 1, N, N) admissibility mask), saving only g and the weights."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, wq: Tensor, wk: Tensor, beta: float,  # type: ignore[override]
                allowed: Tensor | None) -> Tensor:
        q, k, w = _attention_weights(g, wq, wk, beta, allowed)
        a1, a2 = w @ k, w.transpose(-1, -2) @ q
        ctx.save_for_backward(g, wq, wk, allowed)
        ctx.beta = beta
        return -(torch.einsum("...hny,hyd->...nd", a1, wq) + torch.einsum("...hny,hyd->...nd", a2, wk))

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, wq, wk, allowed = ctx.saved_tensors
        beta = ctx.beta
        q, k, w = _attention_weights(g, wq, wk, beta, allowed)
        a1, a2 = w @ k, w.transpose(-1, -2) @ q
        da1 = -torch.einsum("...nd,hyd->...hny", u, wq)
        da2 = -torch.einsum("...nd,hyd->...hny", u, wk)
        dw = da1 @ k.transpose(-1, -2) + q @ da2.transpose(-1, -2)
        ds = w * (dw - (w * dw).sum(-1, keepdim=True))
        dq = w @ da2 + beta * (ds @ k)
        dk = w.transpose(-1, -2) @ da1 + beta * (ds.transpose(-1, -2) @ q)
        dg = torch.einsum("...hny,hyd->...nd", dq, wq) + torch.einsum("...hny,hyd->...nd", dk, wk)
        dwq = -torch.einsum("...hny,...nd->hyd", a1, u) + torch.einsum("...hny,...nd->hyd", dq, g)
        dwk = -torch.einsum("...hny,...nd->hyd", a2, u) + torch.einsum("...hny,...nd->hyd", dk, g)
        return dg, dwq, dwk, None, None
