"""Shared test set-up: quiet, CPU-only, loopback-only Ray/DeepSpeed, the shipped data root, and how the suite is
split between pytest-xdist workers (``make test`` runs ``-n 2 --dist loadgroup``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from etbench.data.paths import data_root

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = data_root(check=False)  # $ETBENCH_DATA, else ../shared/data: the one data root


# What a test may not leave behind for the next one in the same process (order dependence): a Ray session, another
# working directory, or changes to these environment variables (Ray's address and temp dir, Tune's and etbench's
# settings, the tracking URI). A test that leaves one fails here, after the environment has been put back.
WATCHED_ENV = ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_GCS_SERVER_PORT", "TUNE_GLOBAL_CHECKPOINT_S",
               "TUNE_DISABLE_STRICT_METRIC_CHECKING", "MLFLOW_TRACKING_URI", "ETBENCH_STORAGE", "ETBENCH_DATA",
               "ETBENCH_CLUSTER_CONFIG")


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    import sys

    cwd, env = os.getcwd(), {k: os.environ.get(k) for k in WATCHED_ENV}
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    left = []
    if os.getcwd() != cwd:
        left.append(f"cwd {os.getcwd()} (was {cwd})")
        os.chdir(cwd)
    for k, v in env.items():
        if os.environ.get(k) != v:
            left.append(f"${k}={os.environ.get(k)!r} (was {v!r})")
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        left.append("a Ray session (ray.is_initialized())")
        sys.modules["ray"].shutdown()
    assert not left, f"the test left behind: {'; '.join(left)}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the small real datasets: ``$ETBENCH_DATA``, else the copy beside the repo (``../shared/data``)."""
    return SHARED_DATA


def require_file(path: Path) -> Path:
    """Skip the calling test when a shipped data file is absent."""
    if not path.exists():
        pytest.skip(f"shipped data file not found: {path}")
    return path


# --- parallel runs (pytest-xdist, --dist loadgroup) --------------------------------------------------------------
# The suite mostly waits on Ray, DeepSpeed and MLflow processes, so two workers nearly halve its wall time. Each test
# module is one scheduling unit (its module-scoped fixtures — a Ray cluster, a tuned sweep — are set up once, and
# its tests run in file order). The modules that start clusters with the `ray` CLI share one unit: each rewrites
# Ray's default-address file /tmp/ray/ray_current_cluster while its cluster lives, so they never run side by side.
# Every other test is isolated by construction: its own tmp_path stores, its own local Ray on a port chosen at
# start (etbench.ray_local), its own processes stopped by PID.
CLI_CLUSTER_MODULES = ("test_multinode.py", "test_cluster.py", "test_multinode_autoscale.py")
# the longest units first, so that no long module starts last and runs alone at the end
LONGEST_FIRST = ("ray-cli-clusters", "test_tuning.py", "test_distributed.py", "test_sweep.py", "test_quickstart.py",
                 "test_cluster_storage.py", "test_bench_core.py", "test_engine_graph.py", "test_bench_report.py")


def xdist_unit(module_file: str) -> str:
    """The scheduling unit of a test module under ``--dist loadgroup``."""
    return "ray-cli-clusters" if module_file in CLI_CLUSTER_MODULES else module_file


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the marks into the node ids (registered
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:  # after us: runs first)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_unit(item.path.name)))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a plain run keeps the order it was given (e.g. files in reverse, to hunt order dependence)
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(xdist_unit(it.path.name), len(rank)), order[id(it)]))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuse to run when ``--dist loadgroup`` did not take: every test would be scheduled on its own, and the
    ray-CLI cluster modules would run side by side (seen with pytest 9, whose node ids xdist 3.x cannot suffix)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup"):
        ungrouped = [it.nodeid for it in session.items if "@" not in it.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist --dist loadgroup did not group {len(ungrouped)} tests (e.g. "
                                    f"{ungrouped[0]}); pytest {pytest.__version__}: see pyproject's pytest pin")
