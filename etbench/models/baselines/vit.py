"""Standard-transformer baselines for masked image completion (SPEC §2): MAE-style masked autoencoders.

They share the ET's tokens, MASK/CLS/positions, decoder, mask and loss (:class:`MaskedPatchModel`); only
``process`` differs: pre-norm transformer blocks (multi-head softmax attention *with* values + GELU MLP,
``torch.nn.TransformerEncoderLayer``) and a final ``nn.LayerNorm`` instead of T energy-descent steps.

- ``vit``: depth T (= the ET's steps), separate weights, the ET's width and heads;
- ``vit-tied``: ONE block applied T times (isolates "energy" from "recurrence");
- ``vit-pm``: depth T, separate weights, width chosen so the parameter count is within 5 % of the ET's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from etbench.models.entry import ModelEntry
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET, MaskedPatchModel, flops_on_meta

PARAM_MATCH_RTOL = 0.05


class ViTArch(BaseModel):
    """Sizes of one baseline: width, heads, MLP hidden width, depth (applications) and whether weights are tied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int
    heads: int
    mlp_hidden: int
    depth: int
    tied: bool = False

    def num_blocks(self) -> int:
        return 1 if self.tied else self.depth


class MaskedViT(MaskedPatchModel):
    """Pre-norm transformer encoder on the masked patch tokens, final LayerNorm, the shared linear decoder."""

    def __init__(self, image_shape: tuple[int, int, int], patch: int, arch: ViTArch, token_init_std: float = 0.002):
        if arch.dim % arch.heads:
            raise ValueError(f"width {arch.dim} is not divisible by heads {arch.heads}")
        super().__init__(image_shape, patch, arch.dim, token_init_std=token_init_std)
        self.arch = arch
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                arch.dim, arch.heads, dim_feedforward=arch.mlp_hidden, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(arch.num_blocks())
        )
        self.norm = nn.LayerNorm(arch.dim)

    def process(self, x: Tensor) -> Tensor:
        for i in range(self.arch.depth):
            x = self.blocks[0 if self.arch.tied else i](x)
        return self.norm(x)

    def flops_per_image(self) -> int:
        """Forward matmul FLOPs (2 per multiply-add) for one image.

        Per block application on n = N + 1 tokens: QKV 6nd², out-projection 2nd², scores 2n²d, attention·V 2n²d,
        MLP 4ndf; times depth (a tied block still runs ``depth`` times), plus the patch encoder/decoder.
        Element-wise work (LayerNorm, softmax, GELU, residuals) is not counted.
        """
        n, d, f = self.num_tokens, self.arch.dim, self.arch.mlp_hidden
        per_block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * f
        return self.io_flops() + self.arch.depth * per_block


def vit_param_count(image_shape: tuple[int, int, int], patch: int, arch: ViTArch) -> int:
    """Parameters of :class:`MaskedViT` in closed form (used by the width search, checked against the module)."""
    c, h, w = image_shape
    p, n = c * patch * patch, (h // patch) * (w // patch)
    d, f = arch.dim, arch.mlp_hidden
    io = (p * d + d) + (d * p + p) + 2 * d + (n + 1) * d  # encoder, decoder, CLS + MASK, positions
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # qkv, out, mlp, two norms
    return io + arch.num_blocks() * block + 2 * d


def et_param_count(image_shape: tuple[int, int, int], patch: int, et: ETConfig) -> int:
    """Parameters of the image ET of these sizes, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return ImageET(image_shape, patch, et).num_parameters()


def _heads_for(width: int, max_heads: int) -> int:
    """The most heads ≤ ``max_heads`` that divide ``width``."""
    return next(h for h in range(min(max_heads, width), 0, -1) if width % h == 0)


def match_parameters(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float, target: int,
                     rtol: float = PARAM_MATCH_RTOL) -> ViTArch:
    """Depth-T untied architecture whose parameter count is within ``rtol`` of ``target``.

    Widths are searched over multiples of the ET's head count H (all H heads kept); widths below H use the
    largest head count dividing them. First with ``mlp_ratio`` (closest count wins); failing that, the MLP
    hidden width is solved for at each width (the MLP ratio closest to ``mlp_ratio`` wins). Raises when neither
    reaches ``rtol``.
    """
    depth, max_heads = et.steps, et.heads

    def arch(d: int, f: int | None = None) -> ViTArch:
        hidden = max(1, round(mlp_ratio * d)) if f is None else f
        return ViTArch(dim=d, heads=_heads_for(d, max_heads), mlp_hidden=hidden, depth=depth)

    def count(a: ViTArch) -> int:
        return vit_param_count(image_shape, patch, a)

    def err(a: ViTArch) -> float:
        return abs(count(a) - target) / target

    widths: list[int] = list(range(1, max_heads))
    d = max_heads
    while count(arch(d)) <= target * (1 + rtol):  # the count grows with d: stop once past the tolerance band
        widths.append(d)
        d += max_heads
    widths.append(d)
    best = min((arch(w) for w in widths), key=err)
    if err(best) <= rtol:
        return best
    solved: list[ViTArch] = []
    for w in widths:
        per_hidden = depth * (2 * w + 1)  # each MLP hidden unit: w in + w out weights + 1 bias, in every block
        f = round((target - count(arch(w, f=0))) / per_hidden)
        if f >= 1 and err(a := arch(w, f=f)) <= rtol:
            solved.append(a)
    if solved:  # the width whose MLP ratio strays least from the asked one
        return min(solved, key=lambda a: abs(math.log(a.mlp_hidden / (mlp_ratio * a.dim))))
    raise ValueError(
        f"vit-pm: no width (a multiple of the {max_heads} heads) or MLP width gives a parameter count "
        f"within {rtol:.0%} of the ET's {target} (image_shape {image_shape}, patch {patch}, depth {depth})"
    )


def vit_arch(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float = 4.0, *,
             tied: bool = False, param_match: bool = False) -> ViTArch:
    """The baseline's sizes: depth T at the ET's width and heads (``tied``: one block applied T times), or, with
    ``param_match``, the width (and MLP width) whose parameter count is within 5 % of the ET's."""
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    if param_match:
        if tied:
            raise ValueError("a parameter-matched ViT is untied: give tied or param_match, not both")
        return match_parameters(image_shape, patch, et, mlp_ratio, et_param_count(image_shape, patch, et))
    if et.dim % et.heads:
        raise ValueError(f"ViT: width {et.dim} is not divisible by heads {et.heads}")
    hidden = max(1, round(mlp_ratio * et.dim))
    return ViTArch(dim=et.dim, heads=et.heads, mlp_hidden=hidden, depth=et.steps, tied=tied)


def build_vit(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float = 4.0, *,
              tied: bool = False, param_match: bool = False) -> MaskedViT:
    """The baseline beside the ET of sizes ``et`` (see ``vit_arch``), for this image geometry, with its token init."""
    arch = vit_arch(image_shape, patch, et, mlp_ratio, tied=tied, param_match=param_match)
    model = MaskedViT(image_shape, patch, arch, token_init_std=et.token_init_std)
    expected = vit_param_count(image_shape, patch, arch)
    if model.num_parameters() != expected:  # the width search relies on the closed form
        raise RuntimeError(f"ViT: closed-form parameter count {expected} != module's {model.num_parameters()}")
    return model


def _entry(name: str, build: Callable[..., MaskedViT], summary: str) -> ModelEntry:
    return ModelEntry(name=name, kind="image", family="vit", build=build, flops=flops_on_meta(build),
                      options=("et", "mlp_ratio"), summary=summary)


ENTRIES = (
    _entry("vit", build_vit, "depth T, separate weights, the ET's width and heads"),
    _entry("vit-tied", partial(build_vit, tied=True), "one block applied T times"),
    _entry("vit-pm", partial(build_vit, param_match=True), "depth T, width matched to the ET's parameter count"),
)
