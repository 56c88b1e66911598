"""Model registry: name → builder, with parameter count and FLOPs per sample, plus the per-dataset presets."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET, MaskedPatchModel

IMAGE_MODELS = ("et", "vit", "vit-tied", "vit-pm")


class ImagePreset(BaseModel):
    """Image geometry and ET sizes for one dataset; small presets are not paper-comparable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_shape: tuple[int, int, int]
    patch: int
    et: ETConfig
    paper_comparable: bool = False


IMAGE_PRESETS: dict[str, ImagePreset] = {
    "digits": ImagePreset(
        image_shape=(1, 8, 8), patch=2, et=ETConfig(dim=64, heads=4, head_dim=16, memories=256, steps=12)
    ),
    "mnist": ImagePreset(
        image_shape=(1, 28, 28), patch=4, et=ETConfig(dim=128, heads=4, head_dim=32, memories=512, steps=12)
    ),
    "cifar10": ImagePreset(
        image_shape=(3, 32, 32), patch=4, et=ETConfig(dim=256, heads=4, head_dim=64, memories=1024, steps=12)
    ),
    "imagenet": ImagePreset(
        image_shape=(3, 224, 224),
        patch=16,
        et=ETConfig(dim=768, heads=12, head_dim=64, memories=3072, steps=12, alpha=0.1),
        paper_comparable=True,
    ),
}
IMAGE_PRESETS["imagefolder"] = IMAGE_PRESETS["imagenet"].model_copy(update={"paper_comparable": False})


class ImageModelSpec(BaseModel):
    """Everything needed to build one image model; baselines reuse the ET's width, heads and T as depth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "et"
    image_shape: tuple[int, int, int]
    patch: int
    et: ETConfig = Field(default_factory=ETConfig)
    mlp_ratio: float = 4.0

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in IMAGE_MODELS:
            raise ValueError(f"unknown image model {v!r}; allowed: {', '.join(IMAGE_MODELS)}")
        return v


def build_image_model(spec: ImageModelSpec) -> MaskedPatchModel:
    """Build the registered image model ``spec.name``."""
    if spec.name == "et":
        return ImageET(spec.image_shape, spec.patch, spec.et)
    from etbench.models.baselines.vit import build_vit

    return build_vit(spec)


def describe(model: MaskedPatchModel) -> dict[str, float]:
    """Parameter count and forward FLOPs per image (the cost columns)."""
    return {"params": model.num_parameters(), "flops_per_sample": model.flops_per_image()}
