"""The fields every node classifier of the graph task shares (the graph ET and the GNN baselines), validated once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator


class NodeClassifierConfig(BaseModel):
    """Input width, number of classes and dropout of a node classifier; errors name the field and what is allowed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int
    num_classes: int = 2
    dropout: float = 0.0

    @field_validator("in_dim")
    @classmethod
    def _in_dim(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"in_dim must be a positive integer, got {v}")
        return v

    @field_validator("num_classes")
    @classmethod
    def _classes(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"num_classes must be ≥ 2, got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {v}")
        return v
