"""μP for the image models: the width parametrisation under which the best learning rate transfers across widths.

Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"
(arXiv:2203.03466), Table 3 (Adam). With ``r = base_width / width`` (so μP equals the standard parametrisation at
``base_width``; the ``mup`` package's base-shape convention):

- input weights (the patch encoder), all biases, LayerNorm parameters, CLS/MASK tokens and positions:
  init and Adam lr unchanged;
- hidden weights (every other matrix; both dimensions grow with the width — the ViT's QKV, out-projection and MLP,
  the ET's W^K, W^Q and memories ξ): init std ∝ 1/sqrt(fan_in) (the builders' default; for the ET that is
  ``et.init: width``, which the config requires with μP), Adam lr × r;
- the output weight (the linear decoder D → patch): init std × sqrt(r) (variance ∝ 1/fan_in²), Adam lr × r;
- the ViT's query projection starts at zero (TP5's recommendation, so attention is uniform at init at every width).

Deviation, stated: attention keeps the 1/sqrt(head width) logit scale of ``nn.MultiheadAttention`` and the ET's
β = 1/sqrt(Y) (SPEC §1.2) instead of μP's 1/head width; with the heads fixed and the head width growing this matters
only at widths far above the base. The per-parameter lr reaches the optimiser through the model's
``lr_multipliers()`` (``etbench.engine.backend.optimizer_groups``). Written by hand: the ``mup`` package installs,
but needs its own readout module and base-shape files; the rules above are a few lines over the named parameters.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Role = Literal["input", "hidden", "output"]
PARAMS = ("standard", "mup")


def model_width(model: nn.Module) -> int:
    """The token width D of a masked patch model (its patch encoder's output)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Linear):
        raise TypeError(f"μP is defined for the masked patch image models; {type(model).__name__} has no encoder")
    return encoder.out_features


def role(name: str, p: nn.Parameter) -> Role:
    """μP role of one named parameter of a masked patch model (see the module docstring)."""
    if name == "decoder.weight":
        return "output"
    if p.dim() >= 2 and name not in ("encoder.weight", "pos_embed"):
        return "hidden"
    return "input"


def lr_multipliers(model: nn.Module, base_width: int) -> dict[str, float]:
    """Adam lr multiplier per parameter name: base_width / width for hidden and output weights, 1 otherwise."""
    r = base_width / model_width(model)
    return {n: (r if role(n, p) != "input" else 1.0) for n, p in model.named_parameters()}


@torch.no_grad()
def apply_mup(model: nn.Module, base_width: int) -> nn.Module:
    """Re-initialise ``model`` (a ``MaskedPatchModel``) for μP at ``base_width`` and record its lr multipliers, which
    its ``lr_multipliers()`` hands to the optimiser."""
    if not callable(getattr(model, "lr_multipliers", None)):
        raise TypeError(f"{type(model).__name__} has no lr_multipliers() hook: μP would change its init only")
    if base_width < 1:
        raise ValueError(f"base_width must be a positive integer, got {base_width}")
    width = model_width(model)
    r = base_width / width
    decoder = model.decoder
    assert isinstance(decoder, nn.Linear)
    decoder.weight.mul_(math.sqrt(r))
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            module.in_proj_weight[: module.embed_dim].zero_()  # the query rows of the packed QKV projection
    model.mup_lr_multipliers = lr_multipliers(model, base_width)  # read by MaskedPatchModel.lr_multipliers()
    return model
