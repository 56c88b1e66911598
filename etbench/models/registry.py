"""The one list of models: (kind, name) → ``ModelEntry`` (builder, family, analytic FLOPs), plus the image presets.

Every other module asks here for model names, builders and costs (timm's ``create_model`` / ``list_models`` design).
Each model module declares ``ENTRIES`` at its bottom; ``MODEL_MODULES`` below is the one explicit list of those
modules, in registry order (which is also the display order of tables and figures). Adding a model family is one
module with its ``ENTRIES`` plus one line in ``MODEL_MODULES``. Calling conventions per kind: ``etbench.models.entry``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from etbench.models import graph, graphcls, image, ladder
from etbench.models.baselines import gnn, vit, xgbgraph
from etbench.models.baselines import graphcls as graphcls_baselines
from etbench.models.entry import KINDS, ModelEntry
from etbench.models.et_config import ETConfig
from etbench.models.image import MaskedPatchModel

MODEL_MODULES = (image, ladder, vit, graph, gnn, xgbgraph, graphcls, graphcls_baselines)

_TABLE: dict[tuple[str, str], ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    """Add ``entry``; a second model of the same kind and name is an error (names identify runs)."""
    key = (entry.kind, entry.name)
    if key in _TABLE:
        raise ValueError(f"{entry.kind} model {entry.name!r} is already registered")
    _TABLE[key] = entry
    return entry


for _module in MODEL_MODULES:
    for _entry in _module.ENTRIES:
        register(_entry)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(KINDS)}")


def names(kind: str, family: str | None = None) -> tuple[str, ...]:
    """Names of the ``kind`` models (of one ``family`` if given), in registry order."""
    _check_kind(kind)
    return tuple(e.name for e in _TABLE.values() if e.kind == kind and family in (None, e.family))


def all_names() -> tuple[str, ...]:
    """Every model name once, in registry order (a name shared by kinds, like "et", at its first place)."""
    return tuple(dict.fromkeys(name for _, name in _TABLE))


def get(kind: str, name: str) -> ModelEntry:
    """The entry of model ``name`` of ``kind``; an unknown name raises ValueError listing the allowed ones."""
    _check_kind(kind)
    entry = _TABLE.get((kind, name))
    if entry is None:
        raise ValueError(f"unknown {kind} model {name!r}; allowed: {', '.join(names(kind))}")
    return entry


def build(kind: str, name: str, /, **inputs: Any) -> nn.Module:
    """Build model ``name`` from the kind's inputs and its options (see ``etbench.models.entry``)."""
    return get(kind, name).build(**inputs)


def flops(kind: str, name: str, /, **inputs: Any) -> float:
    """Analytic forward FLOPs per sample (per image, per node) of model ``name``."""
    return float(get(kind, name).flops(**inputs))


def options(kind: str, name: str, source: object) -> dict[str, Any]:
    """The builder options of model ``name`` read from ``source`` (a run's ``model`` config, or any object with those
    attributes), so callers never branch on the model name."""
    return {k: getattr(source, k) for k in get(kind, name).options}


def num_parameters(kind: str, name: str, /, **inputs: Any) -> int:
    """Parameter count of model ``name``, built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(kind, name, **inputs).parameters())


# --- image presets ------------------------------------------------------------------------------------------------
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
    pm_shape: Literal["width", "width-depth"] = "width"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        get("image", v)
        return v


def build_image_model(spec: ImageModelSpec) -> MaskedPatchModel:
    """Build the image model ``spec.name`` (a typed shortcut for ``build("image", …)``)."""
    model = build("image", spec.name, image_shape=spec.image_shape, patch=spec.patch,
                  **options("image", spec.name, spec))
    assert isinstance(model, MaskedPatchModel)
    return model


def describe(model: MaskedPatchModel) -> dict[str, float]:
    """Parameter count and forward FLOPs per image (the cost columns)."""
    return {"params": model.num_parameters(), "flops_per_sample": model.flops_per_image()}
