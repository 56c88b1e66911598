"""Stable identity of a resolved config: the same config gives the same hash on every machine.

:func:`config_hash` hashes whatever it is given. A run's identity is ``RunConfig.hash`` (etbench.config), which
hands it the dump with the execution settings (``etbench.config.EXECUTION_FIELDS``) at their defaults."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; floats written by repr so 0.1 stays 0.1."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (a dict or anything with ``model_dump``)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
