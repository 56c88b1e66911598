"""Typed, validated configuration of the Energy Transformer core (SPEC §1)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HN_KINDS = ("relu", "softmax")
TERMS = ("attn+hn", "attn", "hn")
GRAD_MODES = ("analytic", "autograd")
INIT_MODES = ("spec", "width")
PAPER_DIM, PAPER_MEMORIES = 768, 3072  # the size the authors' init standard deviations were chosen for (SPEC §1.5)


class ETConfig(BaseModel):
    """Sizes, dynamics and initialisation of one ET block.

    ``memories`` (M) wins over ``mem_ratio`` when both are given; otherwise M = round(mem_ratio · dim).
    Defaults follow SPEC §1 (T = 12, α = 0.1, β = 1/√Y, authors' init scales).

    Initialisation (SPEC §1.5): ``init: spec`` draws W^K, W^Q with std ``attn_init_std`` and ξ with std
    ``mem_init_std``; ``init: width`` multiplies them by √(768/D) and √(3072/M), so the authors' init-time dynamics
    (sized for D = 768, M = 3072) hold at any width — identical to ``spec`` on the ImageNet preset. The CLS/MASK
    tokens and positions have their own ``token_init_std``, never tied to the attention init.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(256, description="token width D")
    heads: int = Field(4, description="attention heads H")
    head_dim: int = Field(64, description="per-head key/query width Y")
    memories: int | None = Field(None, description="Hopfield memories M (overrides mem_ratio)")
    mem_ratio: float = Field(4.0, description="M = mem_ratio · D when memories is not given")
    steps: int = Field(12, description="descent steps T")
    alpha: float = Field(0.1, description="descent step size α")
    self_attention: bool = Field(True, description="include B = C in the attention sum (paper: False)")
    hn_kind: Literal["relu", "softmax"] = "relu"
    terms: Literal["attn+hn", "attn", "hn"] = "attn+hn"
    grad_mode: Literal["analytic", "autograd"] = "analytic"
    eps: float = 1e-5
    hn_beta_init: float = 0.01
    attn_init_std: float = 0.002
    mem_init_std: float = 0.02
    init: Literal["spec", "width"] = Field("spec", description="spec: stds as given; width: scaled to D and M")
    token_init_std: float = Field(0.002, description="std of the CLS/MASK tokens and positions (image models)")

    @field_validator("dim", "heads", "head_dim", "steps")
    @classmethod
    def _positive_int(cls, v: int, info) -> int:  # type: ignore[no-untyped-def]
        if v <= 0:
            raise ValueError(f"{info.field_name} must be a positive integer, got {v}")
        return v

    @field_validator("memories")
    @classmethod
    def _positive_mem(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"memories must be a positive integer (or null to use mem_ratio), got {v}")
        return v

    @field_validator("mem_ratio", "alpha", "eps", "hn_beta_init", "attn_init_std", "mem_init_std",
                     "token_init_std")
    @classmethod
    def _positive_float(cls, v: float, info) -> float:  # type: ignore[no-untyped-def]
        if not v > 0:
            raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _mem_at_least_one(self) -> ETConfig:
        if self.num_memories < 1:
            raise ValueError(f"mem_ratio · dim must give at least one memory, got {self.mem_ratio} · {self.dim}")
        return self

    @property
    def num_memories(self) -> int:
        """M, the number of Hopfield memories."""
        return self.memories if self.memories is not None else round(self.mem_ratio * self.dim)

    @property
    def attn_std(self) -> float:
        """The std W^K and W^Q are drawn with under this config's ``init`` mode."""
        return self.attn_init_std * (math.sqrt(PAPER_DIM / self.dim) if self.init == "width" else 1.0)

    @property
    def mem_std(self) -> float:
        """The std the memories ξ are drawn with under this config's ``init`` mode."""
        return self.mem_init_std * (math.sqrt(PAPER_MEMORIES / self.num_memories) if self.init == "width" else 1.0)

    @property
    def use_attn(self) -> bool:
        return self.terms in ("attn+hn", "attn")

    @property
    def use_hn(self) -> bool:
        return self.terms in ("attn+hn", "hn")
