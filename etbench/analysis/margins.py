"""Equivalence margins for the report's TOST column: given to ``make_report``, or declared by the grid.

A grid declares ``analysis: {equivalence_margins: {mse_masked: 0.005}}`` (``etbench.sweep.analysis_spec``); the
sweep records it on the grid's parent run as the tag ``etbench.analysis.margins``. :func:`declared_margins` reads
it back from the store alone (no grid file needed): the union over the experiment's parent runs (one per results
folder), refused when two of them declare different margins for one metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from etbench.analysis import AnalysisError
from etbench.tracking import schema as S
from etbench.tracking.grid_run import grid_runs


def parse_margins_tag(tag: str) -> dict[str, float]:
    """The margins of an ``etbench.analysis.margins`` tag; ValueError when it is not a JSON object of metric name →
    finite margin > 0."""
    try:
        value = json.loads(tag)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {tag!r} ({e})") from None
    ok = isinstance(value, dict) and all(
        isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) and d > 0 for d in value.values())
    if not ok:
        raise ValueError(f"not a JSON object of metric → margin > 0: {tag!r}")
    return {str(k): float(d) for k, d in value.items()}


def declared_margins(client: Any, experiment: str) -> tuple[dict[str, float], list[str]]:
    """The margins the grid(s) of ``experiment`` declared (metric name → δ) and the ids of the parent runs that
    declared them; empty when no parent run has the tag (runs logged before it existed, grids without margins)."""
    found: dict[str, tuple[float, str]] = {}
    sources: list[str] = []
    for run in grid_runs(client, experiment):
        tag = run.data.tags.get(S.TAG_ANALYSIS_MARGINS)
        if tag is None:
            continue
        run_id = run.info.run_id
        try:
            margins = parse_margins_tag(tag)
        except ValueError as e:
            raise AnalysisError(f"grid parent run {run_id} of experiment {experiment!r}: tag "
                                f"{S.TAG_ANALYSIS_MARGINS} is unreadable: {e}") from None
        for metric, delta in margins.items():
            earlier = found.get(metric)
            if earlier is not None and earlier[0] != delta:
                raise AnalysisError(
                    f"experiment {experiment!r}: the grid parent runs {earlier[1]} and {run_id} declare different "
                    f"equivalence margins for {metric} ({earlier[0]:g} and {delta:g}); give the margins to the "
                    f"report explicitly")
            found[metric] = (delta, run_id)
        if margins:
            sources.append(run_id)
    return {m: d for m, (d, _) in sorted(found.items())}, sorted(sources)


def leaf(metric: str) -> str:
    """The logged name of a metric: ``best/test/mse_masked`` → ``mse_masked``."""
    return metric.removeprefix("metrics.").rsplit("/", 1)[-1]


def for_metrics(metrics: Sequence[str], margins: Mapping[str, float]) -> dict[str, float]:
    """The margin of each of ``metrics`` (full names, as the comparison tables carry them) that has one in
    ``margins``, whose keys are full names or logged names (a margin for ``mse_masked`` applies to
    ``best/test/mse_masked``: the same units)."""
    out = {}
    for m in metrics:
        delta = margins.get(m, margins.get(leaf(m)))
        if delta is not None:
            out[m] = float(delta)
    return out
