"""Where data lives: one root, ``$ETBENCH_DATA`` (default ``<repo>/../shared/data``), and how relative paths resolve.

Configs keep paths as written (so a config hash is the same on every machine); a relative path is resolved at load
time against the current directory when it exists there, else against the data root. Every loader (images, graphs,
TU graph classification) and every caller goes through :func:`data_root`; nothing else reads the variable.

``ETBENCH_SHARED_DATA`` was a second name for the same root (read only for an error hint and by the tests); it is no
longer read, and setting it warns so that nobody relies on it silently.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from etbench.data import DatasetError

DATA_ENV = "ETBENCH_DATA"
RETIRED_ENV = "ETBENCH_SHARED_DATA"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_root(*, check: bool = True) -> Path:
    """``$ETBENCH_DATA``, else ``<repo>/../shared/data``; with ``check`` a missing directory is a DatasetError
    naming the variable (so a typo in it reads as that, not as a missing dataset file)."""
    if os.environ.get(RETIRED_ENV):
        warnings.warn(f"${RETIRED_ENV} is no longer read: etbench has one data root, ${DATA_ENV} "
                      f"(now {os.environ.get(DATA_ENV, f'unset, so {DEFAULT_DATA_ROOT}')})",
                      FutureWarning, stacklevel=2)
    value = os.environ.get(DATA_ENV)
    root = Path(value).expanduser() if value else DEFAULT_DATA_ROOT
    if check and not root.is_dir():
        source = f"${DATA_ENV}={value}" if value else f"the default, as ${DATA_ENV} is unset"
        raise DatasetError(f"the data root {root} ({source}) is not a directory; set {DATA_ENV} to the directory "
                           f"that holds the datasets (the shipped copy is {DEFAULT_DATA_ROOT})")
    return root


def resolve_data_path(path: str | Path | None) -> Path | None:
    """``path`` as given when absolute or present in the current directory, else under :func:`data_root`."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return data_root() / p
