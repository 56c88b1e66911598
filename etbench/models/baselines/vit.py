"""Standard-transformer baselines for masked image completion (SPEC §2): MAE-style masked autoencoders.

They share the ET's tokens, MASK/CLS/positions, decoder, mask and loss (:class:`MaskedPatchModel`); only
``process`` differs: pre-norm transformer blocks (multi-head softmax attention *with* values + GELU MLP,
``torch.nn.TransformerEncoderLayer``) and a final ``nn.LayerNorm`` instead of T energy-descent steps.

- ``vit``: depth T (= the ET's steps), separate weights, the ET's width and heads;
- ``vit-tied``: ONE block applied T times (isolates "energy" from "recurrence");
- ``vit-pm``: untied, parameter count within 5 % of the ET's. ``model.pm_shape`` says how the shape is found:
  ``width`` (the default, so every recorded run keeps its shape and hash): depth T, the width alone shrinks — on
  digits to width 12 with heads of width 3 (``docs/image_tuned.md``); ``width-depth``: width × depth with heads of
  width ≥ 8 (:func:`match_shape`; on digits width 16, 2 heads of 8, depth 8).

The FLOP-matched ViT is ``vit`` itself: the same width × depth search matched on forward FLOPs
(``match_shape(..., "flops")``) lands on the ET's width and depth T on the digits, MNIST and CIFAR-10 presets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from etbench.models.entry import ModelEntry
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET, MaskedPatchModel, flops_on_meta

PARAM_MATCH_RTOL = 0.05
MIN_HEAD_WIDTH = 8


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
             tied: bool = False, param_match: bool = False,
             match: Literal["params", "flops"] | None = None) -> ViTArch:
    """The baseline's sizes: depth T at the ET's width and heads (``tied``: one block applied T times); with
    ``param_match``, the width (and MLP width) whose parameter count is within 5 % of the ET's; with ``match``, the
    width × depth shape of :func:`match_shape`."""
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    if match is not None:
        if tied:
            raise ValueError("a matched ViT is untied: give tied or match, not both")
        return match_shape(image_shape, patch, et, mlp_ratio, match)
    if param_match:
        if tied:
            raise ValueError("a parameter-matched ViT is untied: give tied or param_match, not both")
        return match_parameters(image_shape, patch, et, mlp_ratio, et_param_count(image_shape, patch, et))
    if et.dim % et.heads:
        raise ValueError(f"ViT: width {et.dim} is not divisible by heads {et.heads}")
    hidden = max(1, round(mlp_ratio * et.dim))
    return ViTArch(dim=et.dim, heads=et.heads, mlp_hidden=hidden, depth=et.steps, tied=tied)


def vit_flops(image_shape: tuple[int, int, int], patch: int, arch: ViTArch) -> int:
    """Forward FLOPs per image of :class:`MaskedViT` in closed form (the same count as its ``flops_per_image``)."""
    c, h, w = image_shape
    p, n = c * patch * patch, (h // patch) * (w // patch)
    t, d, f = n + 1, arch.dim, arch.mlp_hidden
    return 4 * n * p * d + arch.depth * (8 * t * d * d + 4 * t * t * d + 4 * t * d * f)


def _heads_of_width(width: int, max_heads: int, min_head_width: int = MIN_HEAD_WIDTH) -> int:
    """The most heads ≤ ``max_heads`` that divide ``width`` into heads of width ≥ ``min_head_width``."""
    return next(h for h in range(min(max_heads, width // min_head_width), 0, -1) if width % h == 0)


def match_shape(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float,
                metric: Literal["params", "flops"], rtol: float = PARAM_MATCH_RTOL) -> ViTArch:
    """The untied ViT whose ``metric`` (parameters, or forward FLOPs per image) is within ``rtol`` of the ET's.

    Searched on a grid: widths the multiples of 8 (every head ≥ 8 wide: the most heads ≤ the ET's H that divide the
    width into heads of width ≥ 8), depths 1 … 2T, MLP width ``mlp_ratio`` × width. Among the shapes within
    ``rtol``, the one whose depth is closest to the ET's T wins (the comparison keeps the depth where it can, then
    widens or narrows in steps of 8), ties to the smaller error, then the smaller depth. Raises when none is
    within ``rtol``.
    """
    with torch.device("meta"):
        et_model = ImageET(image_shape, patch, et)
        target = et_model.num_parameters() if metric == "params" else et_model.flops_per_image()

    def measure(a: ViTArch) -> int:
        return vit_param_count(image_shape, patch, a) if metric == "params" else vit_flops(image_shape, patch, a)

    candidates: list[tuple[int, float, int, ViTArch]] = []
    for depth in range(1, 2 * et.steps + 1):
        width = MIN_HEAD_WIDTH
        while True:
            a = ViTArch(dim=width, heads=_heads_of_width(width, et.heads), mlp_hidden=max(1, round(mlp_ratio * width)),
                        depth=depth)
            value = measure(a)
            if (err := abs(value - target) / target) <= rtol:
                candidates.append((abs(depth - et.steps), err, depth, a))
            if value > target * (1 + rtol):  # grows with the width: the rest of this depth is past the band
                break
            width += MIN_HEAD_WIDTH
    if not candidates:
        raise ValueError(f"vit-{metric}: no width (multiple of {MIN_HEAD_WIDTH}) × depth (1…{2 * et.steps}) gives "
                         f"{metric} within {rtol:.0%} of the ET's {target} (image_shape {image_shape}, patch {patch})")
    return min(candidates, key=lambda c: c[:3])[3]


def build_vit(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float = 4.0, *,
              tied: bool = False, param_match: bool = False,
              match: Literal["params", "flops"] | None = None) -> MaskedViT:
    """The baseline beside the ET of sizes ``et`` (see ``vit_arch``), for this image geometry, with its token init."""
    arch = vit_arch(image_shape, patch, et, mlp_ratio, tied=tied, param_match=param_match, match=match)
    model = MaskedViT(image_shape, patch, arch, token_init_std=et.token_init_std)
    expected = vit_param_count(image_shape, patch, arch)
    if model.num_parameters() != expected:  # the width search relies on the closed form
        raise RuntimeError(f"ViT: closed-form parameter count {expected} != module's {model.num_parameters()}")
    return model


def _entry(name: str, build: Callable[..., MaskedViT], summary: str) -> ModelEntry:
    return ModelEntry(name=name, kind="image", family="vit", build=build, flops=flops_on_meta(build),
                      options=("et", "mlp_ratio"), summary=summary)


def build_vit_pm(image_shape: tuple[int, int, int], patch: int, et: ETConfig, mlp_ratio: float = 4.0,
                 pm_shape: Literal["width", "width-depth"] = "width") -> MaskedViT:
    """``vit-pm``: the width-only match (``pm_shape: width``), or the width × depth match with heads ≥ 8 wide where
    one lies within 5 % (``width-depth``; an ET too small for any such shape — under ~1.5 k parameters on 8×8
    digits — falls back to the width-only match)."""
    if pm_shape == "width-depth":
        try:
            return build_vit(image_shape, patch, et, mlp_ratio, match="params")
        except ValueError:
            pass
    elif pm_shape != "width":
        raise ValueError(f"pm_shape must be 'width' or 'width-depth', got {pm_shape!r}")
    return build_vit(image_shape, patch, et, mlp_ratio, param_match=True)


ENTRIES = (
    _entry("vit", build_vit, "depth T, separate weights, the ET's width and heads"),
    _entry("vit-tied", partial(build_vit, tied=True), "one block applied T times"),
    ModelEntry(name="vit-pm", kind="image", family="vit", build=build_vit_pm, flops=flops_on_meta(build_vit_pm),
               options=("et", "mlp_ratio", "pm_shape"),
               summary="untied, parameter count matched to the ET's (model.pm_shape: width | width-depth)"),
)
