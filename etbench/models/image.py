"""Masked-patch image models (SPEC §2): shared patch tokenisation, and the ET wrapped for images.

Every image model here maps (images (B, C, H, W), replace (B, N) bool) → reconstructed patches (B, N, P):
patchify (channel-major patches, row-major patch order, SPEC §1.6) → linear encode → MASK token where ``replace``
→ prepend CLS → add learned positions → ``process`` (ET descent, or transformer blocks) → drop CLS → linear decode.
Subclasses implement only ``process``; the ET also exposes its energy trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from etbench.models.energy import EnergyLayerNorm, EnergyTrace, EnergyTransformer
from etbench.models.entry import ModelEntry
from etbench.models.et_config import ETConfig


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, N, C·p·p), patches in row-major order, each flattened channel-major as (c, h, w)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(patches: Tensor, image_shape: tuple[int, int, int], patch: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    c, h, w = image_shape
    b = patches.shape[0]
    x = patches.reshape(b, h // patch, w // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class MaskedPatchModel(nn.Module):
    """Patch tokens with CLS, MASK and learned positions; subclasses transform the token set in ``process``."""

    def __init__(self, image_shape: tuple[int, int, int], patch: int, dim: int, token_init_std: float = 0.002):
        super().__init__()
        c, h, w = image_shape
        if h % patch or w % patch:
            raise ValueError(f"image_shape {image_shape} is not divisible by patch {patch}")
        self.image_shape, self.patch, self.dim = tuple(image_shape), patch, dim
        self.num_patches = (h // patch) * (w // patch)
        self.patch_dim = c * patch * patch
        self.encoder = nn.Linear(self.patch_dim, dim)
        self.decoder = nn.Linear(dim, self.patch_dim)
        self.cls_token = nn.Parameter(torch.randn(dim) * token_init_std)
        self.mask_token = nn.Parameter(torch.randn(dim) * token_init_std)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches + 1, dim) * token_init_std)
        self.last_trace: EnergyTrace | None = None

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def tokens(self, images: Tensor, replace: Tensor) -> Tensor:
        """Encoded patches with MASK substituted, CLS prepended, positions added: (B, N + 1, D)."""
        if replace.shape != (images.shape[0], self.num_patches) or replace.dtype != torch.bool:
            raise ValueError(f"replace must be bool ({images.shape[0]}, {self.num_patches}), got "
                             f"{replace.dtype} {tuple(replace.shape)}")
        x = self.encoder(patchify(images, self.patch))
        x = torch.where(replace.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.pos_embed.to(x.dtype)

    def process(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor, replace: Tensor) -> Tensor:
        """Reconstructed patches (B, N, P) in the (normalised) pixel space of the input."""
        return self.decoder(self.process(self.tokens(images, replace))[:, 1:])

    def reconstruct(self, images: Tensor, replace: Tensor) -> Tensor:
        """Reconstructed images (B, C, H, W)."""
        return unpatchify(self(images, replace), self.image_shape, self.patch)

    def io_flops(self) -> int:
        """Matmul FLOPs per image of the patch encoder and decoder."""
        return 2 * 2 * self.num_patches * self.patch_dim * self.dim

    def flops_per_image(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def lr_multipliers(self) -> dict[str, float]:
        """Adam lr multiplier per parameter name for the optimiser's groups (μP: set by
        ``etbench.models.width_param.apply_mup``); empty — every parameter at the base lr — otherwise."""
        return dict(getattr(self, "mup_lr_multipliers", {}))


class ImageET(MaskedPatchModel):
    """The paper's image ET: tokens → T steps of energy descent (one shared block) → energy LayerNorm → decode.

    ``double_norm=True`` reproduces the authors' released pipeline, whose decoder applies the energy LayerNorm a
    second time (reconstruction = LN(LN(x)) W + b, SPEC §1.6); models trained in etbench use a single LN.
    The trace of the last forward pass is kept in ``last_trace`` when ``record_trace`` is on.
    """

    def __init__(self, image_shape: tuple[int, int, int], patch: int, et: ETConfig, double_norm: bool = False):
        super().__init__(image_shape, patch, et.dim, token_init_std=et.token_init_std)
        self.et = EnergyTransformer(et)
        self.double_norm = double_norm
        self.record_trace = False

    def process(self, x: Tensor) -> Tensor:
        x, self.last_trace = self.et.descend(x, trace=self.record_trace)
        g = self.et.norm(x)
        return self.et.norm(g) if self.double_norm else g

    def descend_with_trace(self, images: Tensor, replace: Tensor) -> tuple[Tensor, EnergyTrace]:
        """Reconstructed patches and the energy trace of this pass."""
        x, tr = self.et.descend(self.tokens(images, replace), trace=True)
        assert tr is not None
        g = self.et.norm(x)
        return self.decoder((self.et.norm(g) if self.double_norm else g)[:, 1:]), tr

    @torch.no_grad()
    def inpaint(self, images: Tensor, replace: Tensor, steps: int = 12, alpha: float = 0.1) -> tuple[Tensor, Tensor]:
        """(reconstruction (B, C, H, W), energies (B, steps)); energies[b, t] = E at g before update t."""
        x, tr = self.et.descend(self.tokens(images, replace), steps=steps, alpha=alpha, trace=True)
        assert tr is not None
        g = self.et.norm(x)
        patches = self.decoder((self.et.norm(g) if self.double_norm else g)[:, 1:])
        return unpatchify(patches, self.image_shape, self.patch), tr.E[:, :steps].to(images.dtype)

    def memories_as_patches(self) -> Tensor:
        """The Hopfield memories ξ (M, D) read through the decoder: (M, C·p·p), one patch image per memory."""
        return self.decoder(self.et.hn.xi.detach())

    def flops_per_image(self) -> int:
        return self.io_flops() + self.et.flops(self.num_tokens)


def flops_on_meta(build: Callable[..., MaskedPatchModel]) -> Callable[..., float]:
    """The registry's ``flops`` for an image model: ``flops_per_image`` of a copy built on the meta device, so
    asking the cost of a paper-size model allocates nothing."""

    def flops(**kw: object) -> float:
        with torch.device("meta"):
            return float(build(**kw).flops_per_image())

    return flops


def _build_et(image_shape: tuple[int, int, int], patch: int, et: ETConfig) -> ImageET:
    return ImageET(image_shape, patch, et)


ENTRIES = (
    ModelEntry(name="et", kind="image", family="et", build=_build_et, flops=flops_on_meta(_build_et),
               options=("et",), summary="the paper's image ET: T energy-descent steps of one shared block"),
)

__all__ = ["ENTRIES", "EnergyLayerNorm", "ImageET", "MaskedPatchModel", "flops_on_meta", "patchify", "unpatchify"]
