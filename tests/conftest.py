"""Shared test set-up: quiet, CPU-only, loopback-only Ray/DeepSpeed, and the shipped data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ETBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the small real datasets shipped beside the repo (``../shared/data``)."""
    return SHARED_DATA


def require_file(path: Path) -> Path:
    """Skip the calling test when a shipped data file is absent."""
    if not path.exists():
        pytest.skip(f"shipped data file not found: {path}")
    return path
