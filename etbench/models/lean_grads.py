"""Memory-lean closed-form gradients: ``torch.autograd.Function``s that keep little between forward and backward.

In training, the analytic ∂E/∂g is itself differentiated (first order) by backprop. Left to autograd, every descent
step would keep every intermediate of the energy's gradient — for attention the scores, ω, its products and
their copies; for the Hopfield term h and its masks — until the backward pass. These Functions keep, per call, the
intermediates whose recomputation would cost a wide GEMM: the Hopfield activations ReLU(g ξᵀ) (or softmax p) and
the [Q; K] projection. The attention weights ω are recomputed from [Q; K] (a small batched GEMM and a softmax), and
the energy LayerNorm keeps only x̂ and rstd. Keeping a and [Q; K] instead of recomputing them saves 13 + 6.5
GFLOP of the bench step's 147 (issue 15; the step then does the FLOPs autograd and XLA do) for +150 MB at the bench
config, still ≤ 0.5× the autograd step's peak memory (docs/bench_core.md).

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


def normalise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x̂, rstd): x̂ = (x − mean x) · rstd, rstd = 1/sqrt(var x + ε) over the last dim (rstd keeps it as size 1)."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return xc.mul_(rstd), rstd


class LayerNormGrad(torch.autograd.Function):
    """x, γ (scalar), δ → g = γ x̂ + δ, saving x̂ and rstd (autograd's own graph of the same ops keeps two (…, D)
    tensors per call: x − mean x and γ (x − mean x)).

    Backward (Ū = ∂L/∂g):  ∂L/∂x = γ rstd (Ū − mean Ū − x̂ mean(Ū ⊙ x̂)),  ∂L/∂γ = Σ Ū ⊙ x̂,  ∂L/∂δ = Σ_tokens Ū.
    First order only (``once_differentiable``): nothing in etbench differentiates through the LayerNorm twice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, delta: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        xhat, rstd = normalise(x, eps)
        ctx.save_for_backward(xhat, rstd, gamma)
        return torch.addcmul(delta, xhat, gamma)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xhat, rstd, gamma = ctx.saved_tensors
        need_x, need_gamma, need_delta, _ = ctx.needs_input_grad
        dx = dgamma = ddelta = None
        if need_x:
            proj = (u * xhat).mean(-1, keepdim=True)
            dx = (u - u.mean(-1, keepdim=True)).sub_(xhat * proj).mul_(rstd * gamma)
        if need_gamma:
            dgamma = torch.linalg.vecdot(_flat(u), _flat(xhat)).sum().reshape(gamma.shape)
        if need_delta:
            ddelta = _flat(u).sum(0)
        return dx, dgamma, ddelta, None


class HopfieldReluGrad(torch.autograd.Function):
    """g, ξ → ∂E^HN/∂g = −ReLU(g ξᵀ) ξ, saving g, ξ and the activations a = ReLU(g ξᵀ).

    Signs are kept on the thin (…, D) side: with r = (U ξᵀ) ⊙ 1[h>0], ∂L/∂g = −r ξ and ∂L/∂ξ = −(aᵀU + rᵀg), so no
    pass over the wide (…, M) activations is spent on a negation.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor) -> Tensor:  # type: ignore[override]
        a = linear(g, xi).relu_()
        ctx.save_for_backward(g, xi, a)
        return mm(a, xi).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        g, xi, a = ctx.saved_tensors  # a > 0 exactly where h > 0
        r = linear(u, xi)
        r = torch.ops.aten.threshold_backward.grad_input(r, a, 0, grad_input=r)  # (U ξᵀ) ⊙ 1[h > 0], in place
        dg = mm(r, xi).neg_()
        dxi = (mm_tn(_flat(a), _flat(u)) + mm_tn(_flat(r), _flat(g))).neg_()
        return dg, dxi


class HopfieldSoftmaxGrad(torch.autograd.Function):
    """g, ξ, β → ∂E^HN/∂g = −softmax(β g ξᵀ) ξ, saving g, ξ, β and p = softmax(β g ξᵀ)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, xi: Tensor, beta: Tensor) -> Tensor:  # type: ignore[override]
        p = torch.softmax(beta * linear(g, xi), -1)
        ctx.save_for_backward(g, xi, beta, p)
        return mm(p, xi).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        g, xi, beta, p = ctx.saved_tensors
        dp = linear(u, xi).neg_()
        core = p * (dp - (p * dp).sum(-1, keepdim=True))
        dh = beta * core
        dg = mm(dh, xi)
        dxi = mm_tn(_flat(dh), _flat(g)) - mm_tn(_flat(p), _flat(u))
        # Σ core ⊙ h without keeping h: β h = log p + lse(row) and each row of core sums to 0, so
        # Σ core ⊙ h = Σ core ⊙ log p / β (xlogy: core is exactly 0 where p underflows to 0)
        dbeta = (torch.special.xlogy(core, p).sum() / beta).reshape(beta.shape)
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
                       ) -> tuple[Tensor, Tensor]:
    """[Q; K] (2, L, H, N, Y) from one fused projection and the masked softmax ω (L, H, C, B); empty rows get ω = 0."""
    qk = _split_heads(linear(g, wqk), heads)
    return qk, _softmax_scores(qk, beta, allowed)


def _softmax_scores(qk: Tensor, beta: float, allowed: Tensor | None) -> Tensor:
    """The masked softmax ω (L, H, C, B) of β Q Kᵀ from [Q; K]; empty rows get ω = 0."""
    s = torch.matmul(qk[0], qk[1].transpose(-1, -2)).mul_(beta)
    if allowed is None:
        return torch.softmax(s, -1)
    s = s.masked_fill(~allowed, -torch.inf)
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    return torch.softmax(s, -1).masked_fill(~allowed | empty, 0.0)


def _bmm3(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _read_pair(w: Tensor, qk: Tensor) -> Tensor:
    """[ωK; ωᵀQ] as one (2, L, H, N, Y) tensor, each half written by its bmm in place (no stacking copy)."""
    out = torch.empty_like(qk)
    w3 = _bmm3(w)
    torch.bmm(w3, _bmm3(qk[1]), out=_bmm3(out[0]))
    torch.bmm(w3.transpose(-1, -2), _bmm3(qk[0]), out=_bmm3(out[1]))
    return out


class AttentionGrad(torch.autograd.Function):
    """g, W^Q, W^K → ∂E^ATT/∂g (dense, optional (…, 1, N, N) admissibility mask), saving g, the weights and [Q; K].

    Q and K come from one fused (…, N, D) @ (D, 2HY) projection and the read-out is one (…, N, 2HY) @ (2HY, D) GEMM;
    the backward works with the negated dA₁, dA₂, dω, dS, dQ, dK (P = U [W^Q; W^K]ᵀ = −[dA₁, dA₂]) so that every sign
    lands on a thin tensor.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, wq: Tensor, wk: Tensor, beta: float,  # type: ignore[override]
                allowed: Tensor | None) -> Tensor:
        heads, lead, n = wq.shape[0], g.shape[:-2], g.shape[-2]
        wqk = _fused_w(wq, wk)
        qk, w = _attention_weights(g, wqk, heads, beta, _flat_mask(allowed, lead, n))
        ctx.save_for_backward(g, wq, wk, qk, allowed)
        ctx.beta = beta
        return mm(_merge_heads(_read_pair(w, qk), lead), wqk).neg_()

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, wq, wk, qk, allowed = ctx.saved_tensors
        beta, heads, lead, n = ctx.beta, wq.shape[0], g.shape[:-2], g.shape[-2]
        wqk = _fused_w(wq, wk)
        q, k = qk[0], qk[1]
        w = _softmax_scores(qk, beta, _flat_mask(allowed, lead, n))
        a = _read_pair(w, qk)  # A₁ = ωK, A₂ = ωᵀQ
        p = _split_heads(linear(u, wqk), heads)  # P₁ = −dA₁, P₂ = −dA₂
        p1, p2, q3, k3, w3 = _bmm3(p[0]), _bmm3(p[1]), _bmm3(q), _bmm3(k), _bmm3(w)
        # accumulations write into their input (baddbmm with out=input: FlopCounterMode counts it, unlike baddbmm_)
        dw = torch.bmm(p1, k3.transpose(-1, -2))
        dw = torch.baddbmm(dw, q3, p2.transpose(-1, -2), out=dw).view(w.shape)  # −dω
        ds = _bmm3(w * (dw - (w * dw).sum(-1, keepdim=True)))  # −dS
        d = torch.empty_like(qk)  # −[dQ; dK], each half written in place
        dq, dk = _bmm3(d[0]), _bmm3(d[1])
        torch.baddbmm(torch.bmm(w3, p2, out=dq), ds, k3, alpha=beta, out=dq)
        torch.baddbmm(torch.bmm(w3.transpose(-1, -2), p1, out=dk), ds.transpose(-1, -2), q3, alpha=beta, out=dk)
        dqk = _merge_heads(d, lead)  # −[dQ, dK] as (…, N, 2HY)
        dg = mm(dqk, wqk).neg_()
        dwqk = (mm_tn(_flat(_merge_heads(a, lead)), _flat(u)) + mm_tn(_flat(dqk), _flat(g))).neg_()
        dwq, dwk = dwqk.reshape(2, *wq.shape).unbind(0)
        return dg, dwq, dwk, None, None

