"""Selected hyper-parameters at the edge of their search range (issue 27.8; science review C7).

A tuned comparison is only as fair as its search ranges: a learning rate selected in the top tenth of its range says
the model might have done better past it. Each tuning and final run carries its search space as the tag
``etbench.tune.space`` (JSON: dotted key → ``{"distribution", "low", "high", "values"}``, written by the tune stage);
this module reads it back and names every selected value that sits at an edge:

- ``uniform`` / ``loguniform``: in the outer ``EDGE_FRACTION`` of the range (on a log scale for ``loguniform``);
- ``randint``: equal to ``low`` or ``high``;
- ``choice`` of three or more numbers: the smallest or the largest (with two values every pick is an edge: no flag).
"""

from __future__ import annotations

import json
import math
from typing import Any

#: The outer share of a continuous range counted as its edge, on each side.
EDGE_FRACTION = 0.1


def parse_space(tag: str | None) -> dict[str, dict[str, Any]] | None:
    """The search space of a run's ``etbench.tune.space`` tag; ``None`` when absent or unreadable (older runs)."""
    if not tag:
        return None
    try:
        space = json.loads(tag)
    except json.JSONDecodeError:
        return None
    return space if isinstance(space, dict) else None


def _position(value: float, low: float, high: float, log: bool) -> float:
    if log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    return (value - low) / (high - low)


def edge_note(key: str, value: Any, dim: dict[str, Any]) -> str | None:
    """Why ``value`` of ``key`` is at the edge of ``dim``, or ``None``."""
    name, dist = key.split(".")[-1], dim.get("distribution")
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if dist in ("uniform", "loguniform"):
        low, high = float(dim["low"]), float(dim["high"])
        if not low < high or (dist == "loguniform" and (low <= 0 or v <= 0)):
            return None
        p = _position(v, low, high, dist == "loguniform")
        scale = "log-" if dist == "loguniform" else ""
        if p >= 1 - EDGE_FRACTION:
            return f"{name}={v:.3g} in the top {EDGE_FRACTION:.0%} of its {scale}range [{low:g}, {high:g}]"
        if p <= EDGE_FRACTION:
            return f"{name}={v:.3g} in the bottom {EDGE_FRACTION:.0%} of its {scale}range [{low:g}, {high:g}]"
        return None
    if dist == "randint":
        low, high = int(dim["low"]), int(dim["high"])
        if high > low and v in (low, high):
            return f"{name}={v:g} at the {'top' if v == high else 'bottom'} of [{low}, {high}]"
        return None
    if dist == "choice":
        numbers = sorted({float(x) for x in dim.get("values") or [] if isinstance(x, int | float)
                          and not isinstance(x, bool)})
        if len(numbers) >= 3 and v in (numbers[0], numbers[-1]):
            shown = ", ".join(f"{x:g}" for x in numbers)
            return f"{name}={v:g} the {'largest' if v == numbers[-1] else 'smallest'} of [{shown}]"
    return None


def edge_notes(params: dict[str, Any], space: dict[str, dict[str, Any]] | None) -> str:
    """All edge notes of one selected configuration, '; '-joined ('' when none; '(space not recorded)' for runs
    written before the tag existed)."""
    if space is None:
        return "(space not recorded)"
    notes = [edge_note(k, v, space[k]) for k, v in sorted(params.items()) if k in space]
    return "; ".join(n for n in notes if n)
