"""What the model registry holds: one frozen ``ModelEntry`` per model, and the model kinds.

Each model module declares its entries in an ``ENTRIES`` tuple at its bottom; ``etbench.models.registry`` imports
those modules in one explicit list and registers them. This file sits below both, so a model module never imports
the registry (no import circle). The design follows timm's ``register_model`` / ``create_model`` / ``list_models``.

Calling conventions, by kind (``options`` are the run config's ``model.*`` fields the entry names):

- ``image``: ``build(image_shape=, patch=, **options)`` → a ``MaskedPatchModel``;
  ``flops(image_shape=, patch=, **options)`` → forward FLOPs per image.
- ``graph``: ``build(in_dim=, **options)`` → a node classifier ``(x, edge_index, relations=None) → logits``;
  ``flops(in_dim=, num_nodes=, num_edges=, num_relations=1, **options)`` → forward FLOPs per node.
- ``graphcls``: ``build(in_dim=, num_classes=, pe_dim=, **options)`` → a graph classifier
  ``(x, edge_index, batch, num_graphs=None, pe=None) → logits (G, num_classes)`` (``pe``: k Laplacian eigenvectors
  per node; models without positional encoding ignore it); ``flops(in_dim=, num_classes=, pe_dim=, num_nodes=,
  num_edges=, **options)`` → forward FLOPs per graph of that size (linear in both, so the mean size gives the mean).

A new kind is one more value of ``Kind`` plus its convention here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

Kind = Literal["image", "graph", "graphcls"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its name within its kind, its family, how to build it and its analytic FLOPs.

    ``family`` groups variants of one design ("et", "vit", "gnn"), so sweeps and figures can select, e.g., every
    ViT width × depth or every ET ladder rung without listing names. ``options`` names the ``model.*`` run-config
    fields the builder takes (beside the task's geometry), so callers never branch on the model name.
    """

    name: str
    kind: Kind
    family: str
    build: Callable[..., nn.Module]
    flops: Callable[..., float]
    options: tuple[str, ...] = ()
    summary: str = ""
    differentiable: bool = True  # False: fitted by the model's own ``fit_step`` (boosted trees), one process only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name!r}: unknown kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not self.name or not self.family:
            raise ValueError(f"a model entry needs a name and a family, got name={self.name!r}, "
                             f"family={self.family!r}")
