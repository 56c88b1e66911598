"""A grid's ``analysis:`` section: what ``etbench report`` should know about the grid that no run config holds.

``equivalence_margins`` maps a headline metric (its name as a task logs it, e.g. ``mse_masked``; the names are
:data:`etbench.tracking.schema.TASK_METRIC_NAMES`) to the equivalence margin δ > 0 in the metric's units. The
report then prints, beside each comparison of that metric, the TOST verdict: whether the paired difference is
shown to lie within ±δ (issue 27.4; ``etbench.analysis.power.tost``). The section is never part of a trial's
config: declaring or changing a margin changes no config hash. The sweep records it on the grid's parent run as
the tag ``etbench.analysis.margins`` (:func:`margins_tag`), so a report built from the MLflow store alone reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from etbench.tracking.schema import TASK_METRIC_NAMES

#: Every metric name a margin may name (any task's).
KNOWN_METRICS: tuple[str, ...] = tuple(sorted({n for names in TASK_METRIC_NAMES.values() for n in names}))

Margin = Annotated[float, Field(gt=0, allow_inf_nan=False, description="δ > 0 in the metric's units")]


class AnalysisSpec(BaseModel):
    """The ``analysis:`` section of a grid file."""

    model_config = ConfigDict(extra="forbid")

    equivalence_margins: dict[str, Margin] = Field(default_factory=dict, description=(
        "metric name (mse_masked, psnr, auroc, auprc, macro_f1, rec_at_k, acc) → equivalence margin δ > 0 in "
        "its units: the report adds a TOST verdict (equivalent within ±δ?) to that metric's comparisons"))

    @field_validator("equivalence_margins", mode="before")
    @classmethod
    def _known_metrics(cls, v: object) -> object:
        if isinstance(v, dict):
            unknown = [str(k) for k in v if k not in KNOWN_METRICS]
            if unknown:
                raise ValueError(f"unknown metric(s) {unknown}; allowed: {', '.join(KNOWN_METRICS)} (the metric's "
                                 f"name as a task logs it, without best/test/)")
        return v


def task_error(analysis: AnalysisSpec, kinds: Iterable[str]) -> str | None:
    """Why a margin names a metric none of the grid's tasks (``kinds``: ``image``, ``graph``, ``graphcls``) logs,
    or None: such a margin would never reach a table."""
    kinds = sorted(set(kinds))
    logged = {n for k in kinds for n in TASK_METRIC_NAMES.get(k, ())}
    stray = [m for m in analysis.equivalence_margins if m not in logged]
    if not stray:
        return None
    return (f"analysis.equivalence_margins: metric(s) {stray} are not logged by this grid's task(s) "
            f"{', '.join(kinds)}; allowed: {', '.join(sorted(logged))}")


def margins_tag(analysis: AnalysisSpec) -> str:
    """The parent run's ``etbench.analysis.margins`` tag: the margins as JSON, keys sorted ("{}" for none)."""
    return json.dumps(dict(sorted(analysis.equivalence_margins.items())))


def read_analysis(grid_file: str | Path) -> AnalysisSpec:
    """The ``analysis:`` section of a grid file that already passed ``load_grid`` (the sweep re-reads only this
    section when it opens the grid's parent run); an empty one when the file declares none."""
    raw = yaml.safe_load(Path(grid_file).read_text())
    section = raw.get("analysis") if isinstance(raw, dict) else None
    try:
        return AnalysisSpec.model_validate(section or {})
    except ValidationError as e:  # load_grid refused it already; only a file edited since can get here
        raise ValueError(f"{grid_file}: invalid analysis section: {e}") from None

