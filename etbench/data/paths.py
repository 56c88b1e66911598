"""Where data lives: ``$ETBENCH_DATA`` (default ``<repo>/../shared/data``) and how relative paths resolve.

Configs keep paths as written (so a config hash is the same on every machine); a relative path is resolved at load
time against the current directory when it exists there, else against the data root.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_data_root() -> Path:
    """``$ETBENCH_DATA``, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("ETBENCH_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def resolve_data_path(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return default_data_root() / p
