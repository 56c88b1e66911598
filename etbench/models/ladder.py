"""The energy-constraint ladder (issue 25.6): from the image ET to a pre-LN ViT, one constraint removed per rung.

All rungs share the ET's tokens and decoder (:class:`MaskedPatchModel`) and one configurable block. With
g = LN(x), H heads of width Y, β = 1/√Y, ω_h[A,B] = softmax_B(β Q_hA·K_hB), Q_hA = W^Q_h g_A, K_hB = W^K_h g_B,
each of the T steps is

    x ← x + α u(g),   u_A = Σ_h W^O_hᵀ Σ_B ω_h[A,B] V_hB              (first attention term)
                          + [Σ_h W^K_hᵀ Σ_C ω_h[C,A] Q_hC]            (second attention term, rungs 0–3)
                          + ξ_downᵀ φ(ξ_up g_A)                       (Hopfield / MLP; φ = ReLU, or softmax(β_HN ·))

and the output is LN(x) (the block's own LN while tied; its own LN when untied), then the decoder.

- rung 0 = ``et``: V_hB = K_hB, W^O = W^Q, ξ_down = ξ_up = ξ, LN = the energy LayerNorm (scalar γ > 0, SPEC §1.1),
  one block for all T steps. Then u = −∂E/∂g with E = E^ATT + E^HN (SPEC §1.2–1.4): the ET's descent exactly.
- rung 1 ``ladder-1`` (+ value): V_hB = W^V_h g_B and a free read-out W^O_h (both (H, Y, D)): the value path
  W^Q_hᵀ W^K_h that the energy fixes becomes the standard W^O_hᵀ W^V_h (+2HYD parameters). The first term is then
  no gradient of any energy (its Jacobian is not symmetric), so from here on the update descends no energy, and
  nothing guarantees E falls. With W^V = W^K and W^O = W^Q it is rung 0.
- rung 2 ``ladder-2`` (+ untied Hopfield): ξ_down is its own (M, D) matrix (+MD): a two-layer bias-free MLP.
- rung 3 ``ladder-3`` (+ per-feature LN gain): LN = ``nn.LayerNorm`` (γ ∈ R^D, unclamped; +D − 1).
- rung 4 ``ladder-4`` (− second term): the second attention term is dropped; u is standard multi-head attention
  plus the MLP on the same g (no parameters change; 2HN²Y + 2NDHY fewer FLOPs per step).
- rung 5 ``ladder-5`` (untied steps): every step has its own block (LN, attention, MLP) and the output its own LN:
  parameters grow with T.

What still separates rung 4 from ``vit-tied`` and rung 5 from ``vit`` (``torch.nn.TransformerEncoderLayer``,
pre-norm): (a) a *parallel* block — attention and MLP both read the one g = LN(x) and their sum is added — where the
ViT is sequential, x ← x + Attn(LN₁ x), then x ← x + MLP(LN₂ x), with two LayerNorms; (b) the update is scaled by
α (a reparametrisation of W^O and ξ_down, which changes the optimiser's steps, not the function class); (c) no
biases in Q, K, V, the read-out or the MLP; (d) φ = ReLU (the ET's Hopfield) instead of GELU, hidden width M (the
ET's memories) instead of mlp_ratio·D, head width Y instead of D/H (equal on the presets: H·Y = D, M = 4D); (e) the
ET's init (W ~ N(0, attn_std²), ξ ~ N(0, mem_std²)) instead of PyTorch's; (f) rung 4's output LN is the step's LN
(tied), where ``vit-tied`` has a separate final LN; (g) ``self_attention: false`` masks the diagonal here only.
The ET's memory-lean autograd Functions and energy trace are not used: the ladder computes u in closed form with
plain autograd (more activation memory; same values as the ET's analytic mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from etbench.models.energy import EnergyLayerNorm
from etbench.models.entry import ModelEntry
from etbench.models.et_config import ETConfig
from etbench.models.image import MaskedPatchModel, flops_on_meta


@dataclass(frozen=True)
class Rung:
    """Which ET constraints a ladder block keeps; each rung flips one flag of the one before it."""

    name: str
    value: bool = False  # free value and read-out projections W^V, W^O (else values = keys, read out through W^Q)
    untied_hopfield: bool = False  # separate ξ_down (else ξ both ways)
    feature_norm: bool = False  # nn.LayerNorm with a per-feature γ (else the energy LN's scalar γ)
    second_term: bool = True  # keep the energy gradient's second attention term
    tied_steps: bool = True  # one block for all T steps (else one per step, plus an output LN)
    change: str = ""


RUNGS: tuple[Rung, ...] = (
    Rung("et", change="the ET: u = −∂E/∂g, one block for T steps"),
    Rung("ladder-1", value=True, change="+ value and read-out projections W^V, W^O"),
    Rung("ladder-2", value=True, untied_hopfield=True, change="+ untied Hopfield up/down projections"),
    Rung("ladder-3", value=True, untied_hopfield=True, feature_norm=True, change="+ per-feature LayerNorm gain"),
    Rung("ladder-4", value=True, untied_hopfield=True, feature_norm=True, second_term=False,
         change="− second attention term"),
    Rung("ladder-5", value=True, untied_hopfield=True, feature_norm=True, second_term=False, tied_steps=False,
         change="+ separate weights per step"),
)
RUNG_BY_NAME = {r.name: r for r in RUNGS}


def _heads(g: Tensor, w: Tensor) -> Tensor:
    """(…, N, D) tokens through (H, Y, D) per-head weights → (…, H, N, Y)."""
    return torch.einsum("...nd,hyd->...hny", g, w)


def _read_out(a: Tensor, w: Tensor) -> Tensor:
    """(…, H, N, Y) per-head vectors back through (H, Y, D) weights, summed over heads → (…, N, D)."""
    return torch.einsum("...hny,hyd->...nd", a, w)


class LadderBlock(nn.Module):
    """One block of the ladder: its LayerNorm and the update u(g) of the module docstring, as ``rung`` sets it.

    Parameters are drawn in the ET's order (W^K, W^Q, ξ, then the rung's additions), so rung 0 built under the same
    seed as :class:`etbench.models.image.ImageET` has the same weights.
    """

    def __init__(self, cfg: ETConfig, rung: Rung) -> None:
        super().__init__()
        self.cfg, self.rung = cfg, rung
        h, y, d, m = cfg.heads, cfg.head_dim, cfg.dim, cfg.num_memories
        self.norm: nn.Module = nn.LayerNorm(d, eps=cfg.eps) if rung.feature_norm else EnergyLayerNorm(d, cfg.eps)
        self.beta = 1.0 / math.sqrt(y)
        self.wk = nn.Parameter(torch.randn(h, y, d) * cfg.attn_std)
        self.wq = nn.Parameter(torch.randn(h, y, d) * cfg.attn_std)
        self.xi = nn.Parameter(torch.randn(m, d) * cfg.mem_std)
        self.hn_beta = nn.Parameter(torch.tensor(cfg.hn_beta_init)) if cfg.hn_kind == "softmax" else None
        self.wv = nn.Parameter(torch.randn(h, y, d) * cfg.attn_std) if rung.value else None
        self.wo = nn.Parameter(torch.randn(h, y, d) * cfg.attn_std) if rung.value else None
        self.xi_down = nn.Parameter(torch.randn(m, d) * cfg.mem_std) if rung.untied_hopfield else None

    def attention(self, g: Tensor) -> Tensor:
        q, k = _heads(g, self.wq), _heads(g, self.wk)
        s = self.beta * (q @ k.transpose(-1, -2))  # (…, H, A, B)
        if not self.cfg.self_attention:
            n = g.shape[-2]
            s = s.masked_fill(torch.eye(n, dtype=torch.bool, device=g.device), -torch.inf)
        w = torch.softmax(s, -1)
        v = k if self.wv is None else _heads(g, self.wv)
        u = _read_out(w @ v, self.wq if self.wo is None else self.wo)
        if self.rung.second_term:
            u = u + _read_out(w.transpose(-1, -2) @ q, self.wk)
        return u

    def hopfield(self, g: Tensor) -> Tensor:
        h = g @ self.xi.T
        if self.hn_beta is None:
            a = torch.relu(h)
        else:
            a = torch.softmax(self.hn_beta.clamp_min(1e-6) * h, -1)
        return a @ (self.xi if self.xi_down is None else self.xi_down)

    def update(self, g: Tensor) -> Tensor:
        """u(g); at rung 0 this is −∂E/∂g of the ET's energy (``cfg.terms`` switches either part off)."""
        u = self.attention(g) if self.cfg.use_attn else torch.zeros_like(g)
        return u + self.hopfield(g) if self.cfg.use_hn else u

    def flops_per_step(self, n: int) -> int:
        """Matmul FLOPs of one step on n tokens: projections Q, K (+V) 2nDHY each; scores and ω·V 2Hn²Y each,
        ωᵀ·Q another (second term); read-outs 2nDHY each (W^O; W^K for the second term); Hopfield 4nMD."""
        c = self.cfg
        d, h, y, m = c.dim, c.heads, c.head_dim, c.num_memories
        projections = 2 + self.rung.value + 1 + self.rung.second_term
        attn = projections * 2 * n * d * h * y + (2 + self.rung.second_term) * 2 * h * n * n * y
        return (attn if c.use_attn else 0) + (4 * n * m * d if c.use_hn else 0)


class LadderModel(MaskedPatchModel):
    """A ladder rung on masked patches: T steps x ← x + α u(LN x) of one (or, untied, T) blocks, then LN, decode."""

    def __init__(self, image_shape: tuple[int, int, int], patch: int, et: ETConfig, rung: Rung) -> None:
        super().__init__(image_shape, patch, et.dim, token_init_std=et.token_init_std)
        self.cfg, self.rung = et, rung
        self.blocks = nn.ModuleList(LadderBlock(et, rung) for _ in range(1 if rung.tied_steps else et.steps))
        self.out_norm = None if rung.tied_steps else nn.LayerNorm(et.dim, eps=et.eps)

    def process(self, x: Tensor) -> Tensor:
        for t in range(self.cfg.steps):
            block = self.blocks[0 if self.rung.tied_steps else t]
            x = x + self.cfg.alpha * block.update(block.norm(x))
        return self.blocks[0].norm(x) if self.out_norm is None else self.out_norm(x)

    def flops_per_image(self) -> int:
        return self.io_flops() + self.cfg.steps * self.blocks[0].flops_per_step(self.num_tokens)


def build_rung(image_shape: tuple[int, int, int], patch: int, et: ETConfig, *, rung: str) -> LadderModel:
    """The ladder model ``rung`` ("et" builds rung 0, the ET re-expressed in this block) for this geometry."""
    if rung not in RUNG_BY_NAME:
        raise ValueError(f"unknown ladder rung {rung!r}; allowed: {', '.join(RUNG_BY_NAME)}")
    return LadderModel(image_shape, patch, et, RUNG_BY_NAME[rung])


def _entry(r: Rung) -> ModelEntry:
    build = partial(build_rung, rung=r.name)
    return ModelEntry(name=r.name, kind="image", family="ladder", build=build, flops=flops_on_meta(build),
                      options=("et",), summary=f"ET ladder rung {RUNGS.index(r)}: {r.change}")


ENTRIES = tuple(_entry(r) for r in RUNGS[1:])  # rung 0 is registered as "et" (etbench.models.image)
