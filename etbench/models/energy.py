"""The Energy Transformer block (Hoover et al., NeurIPS 2023; SPEC §1): energies, gradients, descent.

Tokens x ∈ R^{…×N×D}. One block, weights shared over all T steps:

    g = LN(x);   x ← x − α ∂E/∂g,   E = E^ATT(g) + E^HN(g)

Every energy is returned **per sample** (summed over tokens and heads, leading batch dimensions kept). The gradient
∂E/∂g comes either from the closed forms below (``analytic``: no double backward in training) or from
``torch.autograd.grad`` (``autograd``: what the authors' JAX code does). The two agree to float tolerance.

Attention masks: ``mask`` is either a boolean key-padding mask (…, N) — True marks a real token — or a boolean
(…, N, N) matrix whose entry [C, B] says query C may attend key B. ``self_attention=False`` removes the diagonal.
A query with no admissible key contributes neither energy nor gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from etbench.models.et_config import ETConfig
from etbench.models.lean_grads import AttentionGrad, HopfieldReluGrad, HopfieldSoftmaxGrad, LayerNormGrad, normalise

GAMMA_MIN = 1e-4  # γ is clamped to stay > 0 (the descent guarantee needs a positive-definite LN Hessian)


class EnergyLayerNorm(nn.Module):
    """Energy LayerNorm with a **scalar** γ > 0 and a vector δ (SPEC §1.1).

        g = γ (x − mean x) / sqrt(var x + ε) + δ,    g = ∂L/∂x,    L(x) = D γ sqrt(var x + ε) + δ·x

    A per-feature γ (``nn.LayerNorm``) would make ∂g/∂x non-symmetric and break the energy-descent guarantee.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gamma = nn.Parameter(torch.ones(()))
        self.delta = nn.Parameter(torch.zeros(dim))

    def effective_gamma(self) -> Tensor:
        return self.gamma.clamp_min(GAMMA_MIN)

    def forward(self, x: Tensor) -> Tensor:
        """g = γ x̂ + δ; when autograd records, through :class:`LayerNormGrad` (saves x̂ and rstd only)."""
        gamma = self.effective_gamma()
        if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad or self.delta.requires_grad):
            return LayerNormGrad.apply(x, gamma, self.delta, self.eps)
        return torch.addcmul(self.delta, normalise(x, self.eps)[0], gamma)

    def lagrangian(self, x: Tensor) -> Tensor:
        """L(x) per token, shape (…, N)."""
        var = (x - x.mean(-1, keepdim=True)).pow(2).mean(-1)
        return self.dim * self.effective_gamma() * torch.sqrt(var + self.eps) + x @ self.delta


def attention_allowed(mask: Tensor | None, n: int, self_attention: bool, device: torch.device) -> Tensor | None:
    """Boolean (…, N, N) matrix of admissible (query C, key B) pairs, or None when every pair is admissible."""
    allowed: Tensor | None = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be boolean, got {mask.dtype}")
        if mask.shape[-1] != n:
            raise ValueError(f"attention mask last dim {mask.shape[-1]} != number of tokens {n}")
        if mask.dim() >= 3:  # pair mask (…, N, N); an unbatched pair mask needs a leading dim
            if mask.shape[-2] != n:
                raise ValueError(f"pair attention mask must be (…, {n}, {n}), got {tuple(mask.shape)}")
            allowed = mask
        else:  # key-padding mask (B, N): real tokens attend real tokens
            allowed = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    if not self_attention:
        off_diag = ~torch.eye(n, dtype=torch.bool, device=device)
        allowed = off_diag if allowed is None else allowed & off_diag
    return allowed


def project_qk(g: Tensor, wq: Tensor, wk: Tensor) -> tuple[Tensor, Tensor]:
    """Q, K of shape (…, H, N, Y) from tokens g (…, N, D) and W^Q, W^K (H, Y, D), in one fused projection."""
    h, y, _ = wq.shape
    qk = (g @ torch.cat([wq, wk], 0).reshape(2 * h * y, -1).T).unflatten(-1, (2, h, y)).movedim(-4, -2)
    return qk[..., 0, :, :, :], qk[..., 1, :, :, :]  # from (…, 2, H, N, Y)


class EnergyAttention(nn.Module):
    """Energy attention without values or biases (SPEC §1.2), dense over N tokens.

        K_hB = W^K_h g_B,  Q_hC = W^Q_h g_C,  β = 1/√Y
        E^ATT = −(1/β) Σ_h Σ_C log Σ_{B∈S(C)} exp(β Q_hC·K_hB)
        ∂E^ATT/∂g_A = −Σ_h [ W^Q_hᵀ Σ_B ω_h[A,B] K_hB + W^K_hᵀ Σ_C ω_h[C,A] Q_hC ],  ω_h = softmax over keys

    The first gradient term is attention with values tied to the keys; the second pulls token A towards the
    queries that attend to it.
    """

    def __init__(self, cfg: ETConfig) -> None:
        super().__init__()
        self.heads, self.head_dim, self.self_attention = cfg.heads, cfg.head_dim, cfg.self_attention
        self.beta = 1.0 / math.sqrt(cfg.head_dim)
        self.wk = nn.Parameter(torch.randn(cfg.heads, cfg.head_dim, cfg.dim) * cfg.attn_std)
        self.wq = nn.Parameter(torch.randn(cfg.heads, cfg.head_dim, cfg.dim) * cfg.attn_std)

    def _qk(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """Q, K of shape (…, H, N, Y), from one fused projection."""
        return project_qk(g, self.wq, self.wk)

    def _scores(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        q, k = self._qk(g)
        s = self.beta * (q @ k.transpose(-1, -2))  # (…, H, C, B)
        allowed = attention_allowed(mask, g.shape[-2], self.self_attention, g.device)
        empty = None
        if allowed is not None:
            allowed = allowed.unsqueeze(-3)  # broadcast over heads
            empty = ~allowed.any(-1)  # (…, 1|H, C): queries with no admissible key
            s = torch.where(allowed, s, -torch.inf)
            s = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=s.dtype, device=s.device), s)
        return q, k, s, empty

    def _energy_from_scores(self, s: Tensor, empty: Tensor | None) -> Tensor:
        lse = torch.logsumexp(s, -1)  # (…, H, C)
        if empty is not None:
            lse = torch.where(empty, torch.zeros((), dtype=lse.dtype, device=lse.device), lse)
        return -lse.sum((-1, -2)) / self.beta

    def energy(self, g: Tensor, mask: Tensor | None = None) -> Tensor:
        """E^ATT per sample, shape (…)."""
        _, _, s, empty = self._scores(g, mask)
        return self._energy_from_scores(s, empty)

    def grad(self, g: Tensor, mask: Tensor | None = None, need_energy: bool = True) -> tuple[Tensor, Tensor]:
        """Closed-form (∂E^ATT/∂g (…, N, D), E^ATT (…)); the energy is detached (NaN when not ``need_energy``).

        With autograd recording (training), the memory-lean :class:`AttentionGrad` keeps g and [Q; K] for backward.
        """
        if torch.is_grad_enabled():
            allowed = attention_allowed(mask, g.shape[-2], self.self_attention, g.device)
            grad = AttentionGrad.apply(g, self.wq, self.wk, self.beta,
                                       None if allowed is None else allowed.unsqueeze(-3))
            if need_energy:
                with torch.no_grad():
                    return grad, self.energy(g.detach(), mask)
            return grad, g.new_full(g.shape[:-2], float("nan"))
        q, k, s, empty = self._scores(g, mask)
        e = self._energy_from_scores(s, empty)
        w = torch.softmax(s, -1)
        if empty is not None:
            w = w.masked_fill(empty.unsqueeze(-1), 0.0)
        to_q = w @ k  # (…, H, N, Y): Σ_B ω[A,B] K_B, read out through W^Q
        to_k = w.transpose(-1, -2) @ q  # Σ_C ω[C,A] Q_C, read out through W^K
        both = torch.stack([to_q, to_k], -4).movedim(-2, -4)  # (…, N, 2, H, Y)
        wqk = torch.cat([self.wq, self.wk], 0).reshape(2 * self.heads * self.head_dim, -1)
        return -(both.flatten(-3) @ wqk), e


class HopfieldNetwork(nn.Module):
    """Hopfield network acting on each token (SPEC §1.3); ξ ∈ R^{M×D} used in both directions.

    relu:    E^HN = −½ Σ_B Σ_μ ReLU(ξ_μ·g_B)²,          ∂E/∂g_B = −Σ_μ ξ_μ ReLU(ξ_μ·g_B)
    softmax: E^HN = −(1/β) Σ_B log Σ_μ exp(β ξ_μ·g_B),  ∂E/∂g_B = −Σ_μ ξ_μ softmax_μ(β ξ·g_B),  β learnable
    """

    def __init__(self, cfg: ETConfig) -> None:
        super().__init__()
        self.kind = cfg.hn_kind
        self.xi = nn.Parameter(torch.randn(cfg.num_memories, cfg.dim) * cfg.mem_std)
        self.beta = nn.Parameter(torch.tensor(cfg.hn_beta_init)) if self.kind == "softmax" else None

    def _beta(self) -> Tensor:
        assert self.beta is not None
        return self.beta.clamp_min(1e-6)

    def energy(self, g: Tensor) -> Tensor:
        """E^HN per sample, shape (…)."""
        h = g @ self.xi.T
        if self.kind == "relu":
            return -0.5 * torch.relu(h).pow(2).sum((-1, -2))
        b = self._beta()
        return -torch.logsumexp(b * h, -1).sum(-1) / b

    def grad(self, g: Tensor, need_energy: bool = True) -> tuple[Tensor, Tensor]:
        """Closed-form (∂E^HN/∂g, E^HN detached; NaN when not ``need_energy``).

        With autograd recording (training), the memory-lean Functions keep g and the activations for backward.
        """
        if torch.is_grad_enabled():
            if self.kind == "relu":
                grad = HopfieldReluGrad.apply(g, self.xi)
            else:
                grad = HopfieldSoftmaxGrad.apply(g, self.xi, self._beta())
            if need_energy:
                with torch.no_grad():
                    return grad, self.energy(g.detach())
            return grad, g.new_full(g.shape[:-2], float("nan"))
        h = g @ self.xi.T
        if self.kind == "relu":
            a = torch.relu(h)
            return -(a @ self.xi), -0.5 * a.pow(2).sum((-1, -2))
        bh = self._beta() * h
        return -(torch.softmax(bh, -1) @ self.xi), -torch.logsumexp(bh, -1).sum(-1) / self._beta()


class Attention(Protocol):
    """What the ET block needs from an attention module (dense here; sparse over edges for graphs)."""

    def energy(self, g: Tensor, ctx: Tensor | None = None) -> Tensor: ...
    def grad(self, g: Tensor, ctx: Tensor | None = None, need_energy: bool = True) -> tuple[Tensor, Tensor]: ...


@dataclass
class Energies:
    """Per-sample energies at one point g: total E and its two terms, each of shape (…)."""

    E: Tensor
    E_att: Tensor
    E_hn: Tensor


FIXED_POINT_TOL = 1e-3  # relative update ‖Δx‖/‖x‖ below which a descent counts as at its fixed point


def token_grad_norms(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, max) over tokens of the per-token gradient norm ‖∂E/∂g_A‖, each of shape (…) for ∂E/∂g (…, N, D)."""
    norms = grad.detach().norm(dim=-1)
    return norms.mean(-1), norms.amax(-1)


@dataclass
class EnergyTrace:
    """Energies and step diagnostics along a descent, detached, float64 on CPU.

    ``E[..., t]`` is the energy at g before update t (t < T) and ``E[..., T]`` after the last update;
    ``dx_norm[..., t]`` = ‖x_{t+1} − x_t‖ over the sample's tokens. Diagnostics (None in traces made without them):
    ``grad_norm_mean/max[..., t]`` = mean / max over tokens A of ‖∂E/∂g_A‖ at the same points as E (T + 1), and
    ``rel_update[..., t]`` = ‖x_{t+1} − x_t‖ / ‖x_t‖ (T): how far the descent still moves, scale-free.
    """

    E: Tensor
    E_att: Tensor
    E_hn: Tensor
    dx_norm: Tensor
    eps: float = 2.0**-23  # machine epsilon of the dtype the energies were computed in (float32 by default)
    grad_norm_mean: Tensor | None = None
    grad_norm_max: Tensor | None = None
    rel_update: Tensor | None = None

    @property
    def steps(self) -> int:
        return self.dx_norm.shape[-1]

    def rose(self, ulps: float = 8.0) -> Tensor:
        """(…, T) bool: did E increase during update t?

        Any increase larger than the rounding error of computing E counts: ``ulps`` machine epsilons (of the
        descent's dtype) times the magnitude of the summed terms, |E_att| + |E_hn|. No tolerance beyond that noise
        floor — in particular none proportional to |E| at a fixed 1e-6, which for a float64 descent hid real rises
        far larger than its rounding error (|E| is dominated by constants, a step changes it by much less).
        """
        prev, nxt = self.E[..., :-1], self.E[..., 1:]
        scale = (self.E_att.abs() + self.E_hn.abs()).clamp_min(self.E.abs())
        noise = ulps * self.eps * torch.maximum(scale[..., :-1], scale[..., 1:])
        return nxt - prev > noise

    def rise_fraction(self) -> float:
        return float(self.rose().double().mean()) if self.steps else 0.0

    def fixed_point_step(self, tol: float = FIXED_POINT_TOL) -> Tensor:
        """(…) int64: the first update t whose relative update ‖Δx‖/‖x‖ is below ``tol``; −1 when none is (or the
        trace has no ``rel_update``)."""
        if self.rel_update is None or not self.steps:
            return torch.full(self.E.shape[:-1], -1, dtype=torch.long)
        return first_below(self.rel_update, tol)

    def mean_fixed_point_step(self, tol: float = FIXED_POINT_TOL) -> int | None:
        """The first update t at which the relative update, averaged over the traced samples, is below ``tol``
        (what the ``energy/rel_update`` curve shows); None when it never is."""
        if self.rel_update is None or not self.steps:
            return None
        t = int(first_below(self.rel_update.reshape(-1, self.steps).mean(0), tol))
        return None if t < 0 else t

    def rows(self) -> list[dict[str, float | int | bool | str]]:
        """Long-format rows (step, sample, E, E_att, E_hn, dx_norm, rose, then the diagnostics grad_norm_mean,
        grad_norm_max, rel_update, fixed_point_step) for CSV/MLflow. The sample's fixed_point_step is repeated on
        each of its rows, "" when it never reached one; diagnostics the trace lacks are NaN (fixed point "")."""
        t1 = self.E.shape[-1]
        nan1 = torch.full_like(self.E, float("nan"))
        e, ea, eh = (v.reshape(-1, t1) for v in (self.E, self.E_att, self.E_hn))
        gmean, gmax = (nan1 if v is None else v for v in (self.grad_norm_mean, self.grad_norm_max))
        gmean, gmax = gmean.reshape(-1, t1), gmax.reshape(-1, t1)
        dx, rose = self.dx_norm.reshape(-1, t1 - 1), self.rose().reshape(-1, t1 - 1)
        rel = (self.rel_update if self.rel_update is not None else torch.full_like(self.dx_norm, float("nan")))
        rel = rel.reshape(-1, t1 - 1)
        fixed = self.fixed_point_step().reshape(-1)
        out: list[dict[str, float | int | bool | str]] = []
        for b in range(e.shape[0]):
            fp: int | str = int(fixed[b]) if fixed[b] >= 0 else ""
            for t in range(t1):
                last = t == t1 - 1
                out.append({"step": t, "sample": b, "E": float(e[b, t]), "E_att": float(ea[b, t]),
                            "E_hn": float(eh[b, t]), "dx_norm": float("nan") if last else float(dx[b, t]),
                            "rose": False if last else bool(rose[b, t]), "grad_norm_mean": float(gmean[b, t]),
                            "grad_norm_max": float(gmax[b, t]),
                            "rel_update": float("nan") if last else float(rel[b, t]),
                            "fixed_point_step": fp})
        return out


def first_below(values: Tensor, tol: float) -> Tensor:
    """(…) int64: the first index along the last dim where ``values`` < ``tol``; −1 where there is none."""
    below = values < tol
    idx = below.double().argmax(-1)  # the first True (0 when there is none: fixed below)
    return torch.where(below.any(-1), idx, torch.full_like(idx, -1))


class EnergyTransformer(nn.Module):
    """One ET block: energy LayerNorm + energy attention + Hopfield network, run by gradient descent on E."""

    def __init__(self, cfg: ETConfig, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = EnergyLayerNorm(cfg.dim, cfg.eps)
        self.attn = attention if attention is not None else EnergyAttention(cfg)
        self.hn = HopfieldNetwork(cfg)
        self._on_trace: Callable[[EnergyTrace], None] | None = None

    # --- energies -------------------------------------------------------------------------------------------
    def energy(self, g: Tensor, mask: Tensor | None = None) -> Energies:
        """E, E^ATT, E^HN per sample at g (terms switched off by ``cfg.terms`` are zero)."""
        zero = g.new_zeros(g.shape[:-2])
        ea = self.attn.energy(g, mask) if self.cfg.use_attn else zero
        eh = self.hn.energy(g) if self.cfg.use_hn else zero
        return Energies(ea + eh, ea, eh)

    def energy_grad(self, g: Tensor, mask: Tensor | None = None, mode: str | None = None,
                    need_energy: bool = True) -> tuple[Tensor, Energies]:
        """(∂E/∂g, energies at g) by the configured (or given) gradient mode."""
        mode = mode or self.cfg.grad_mode
        if mode == "analytic":
            return self._analytic_grad(g, mask, need_energy)
        if mode == "autograd":
            return self._autograd_grad(g, mask)
        raise ValueError(f"grad_mode must be one of analytic, autograd; got {mode!r}")

    def _analytic_grad(self, g: Tensor, mask: Tensor | None, need_energy: bool = True) -> tuple[Tensor, Energies]:
        grad: Tensor | None = None
        zero = g.new_zeros(g.shape[:-2])
        ea = eh = zero
        if self.cfg.use_attn:
            grad, ea = self.attn.grad(g, mask, need_energy=need_energy)
        if self.cfg.use_hn:
            gh, eh = self.hn.grad(g, need_energy=need_energy)
            grad = gh if grad is None else grad + gh
        assert grad is not None
        return grad, Energies(ea + eh, ea, eh)

    def _autograd_grad(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Energies]:
        create = self.training and torch.is_grad_enabled() and g.requires_grad
        with torch.enable_grad():
            if not g.requires_grad:
                g = g.detach().requires_grad_(True)
            en = self.energy(g, mask)
            (grad,) = torch.autograd.grad(en.E.sum(), g, create_graph=create)
        return grad, Energies(en.E.detach(), en.E_att.detach(), en.E_hn.detach())

    # --- dynamics ---------------------------------------------------------------------------------------------
    @contextmanager
    def probing(self, steps: int | None = None, alpha: float | None = None,
                on_trace: Callable[[EnergyTrace], None] | None = None) -> Iterator[None]:
        """Test-time dynamics: inside the block every descent run with the configured T and α — also the one inside
        a wrapping model's forward — runs ``steps`` updates of step ``alpha`` instead, and hands its trace to
        ``on_trace``. The configuration is restored on exit. (Read-only probes of a trained model: ``etbench
        dynamics``.)"""
        if (steps is not None and steps < 0) or (alpha is not None and alpha <= 0):
            raise ValueError(f"probing needs steps >= 0 and alpha > 0, got steps={steps}, alpha={alpha}")
        saved = self.cfg, self._on_trace
        self.cfg = self.cfg.model_copy(update={k: v for k, v in (("steps", steps), ("alpha", alpha)) if v is not None})
        self._on_trace = on_trace
        try:
            yield
        finally:
            self.cfg, self._on_trace = saved

    def descend(
        self,
        x: Tensor,
        steps: int | None = None,
        alpha: float | None = None,
        mask: Tensor | None = None,
        trace: bool = True,
    ) -> tuple[Tensor, EnergyTrace | None]:
        """Run T steps of g = LN(x); x ← x − α ∂E/∂g. Returns the final tokens and (optionally) the trace."""
        steps = self.cfg.steps if steps is None else steps
        alpha = self.cfg.alpha if alpha is None else alpha
        if steps < 0 or alpha <= 0:
            raise ValueError(f"descend needs steps >= 0 and alpha > 0, got steps={steps}, alpha={alpha}")
        requested, trace = trace, trace or self._on_trace is not None
        es: list[Energies] = []
        dxs: list[Tensor] = []
        rels: list[Tensor] = []
        gns: list[tuple[Tensor, Tensor]] = []
        for _ in range(steps):
            grad, en = self.energy_grad(self.norm(x), mask, need_energy=trace)
            update = alpha * grad
            if trace:
                es.append(en)
                gns.append(token_grad_norms(grad))
                dxs.append(update.detach().flatten(-2).norm(dim=-1))
                rels.append(dxs[-1] / x.detach().flatten(-2).norm(dim=-1))
            x = x - update
        if not trace:
            return x, None
        with torch.no_grad():  # the end point: its energy, and its gradient for the norms only
            g_end = self.norm(x.detach())
            es.append(self.energy(g_end, mask))
            gns.append(token_grad_norms(self.energy_grad(g_end, mask)[0]))

        def stack(name: str) -> Tensor:
            return torch.stack([getattr(e, name).detach() for e in es], -1).double().cpu()

        def per_step(values: list[Tensor]) -> Tensor:
            if values:
                return torch.stack(values, -1).double().cpu()
            return torch.zeros((*x.shape[:-2], 0), dtype=torch.float64)

        tr = EnergyTrace(stack("E"), stack("E_att"), stack("E_hn"), per_step(dxs), torch.finfo(es[0].E.dtype).eps,
                         grad_norm_mean=per_step([m for m, _ in gns]), grad_norm_max=per_step([m for _, m in gns]),
                         rel_update=per_step(rels))
        if self._on_trace is not None:
            self._on_trace(tr)
        return x, tr if requested else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """T steps of descent without the trace (use ``descend`` for the trace)."""
        return self.descend(x, mask=mask, trace=False)[0]

    # --- cost ---------------------------------------------------------------------------------------------------
    def flops_per_step(self, num_tokens: int) -> int:
        """Matmul FLOPs (2 per multiply-add) of one analytic descent step for one sample of N tokens.

        Attention: fused Q/K projection 4NDHY, scores 2HN²Y, ω·K and ωᵀ·Q 4HN²Y, read-out 4NDHY.
        Hopfield: ξ·g 2NMD, ξᵀ·a 2NMD. Element-wise work (LN, softmax, ReLU) is O(N(D+M) + HN²) and not counted.
        """
        n, d, h, y, m = num_tokens, self.cfg.dim, self.cfg.heads, self.cfg.head_dim, self.cfg.num_memories
        attn = 8 * n * d * h * y + 6 * h * n * n * y if self.cfg.use_attn else 0
        hn = 4 * n * m * d if self.cfg.use_hn else 0
        return attn + hn

    def flops(self, num_tokens: int, steps: int | None = None) -> int:
        """Forward matmul FLOPs of T descent steps for one sample."""
        return self.flops_per_step(num_tokens) * (self.cfg.steps if steps is None else steps)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
