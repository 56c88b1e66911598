"""One driver per grid (etbench.sweep.lease): a second driver waits for a live lease and then refuses with the
holder's details; a stale lease, or one whose process on this host is gone, is taken over at once; a driver
releases only its own lease."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etbench.storage import resolve_storage
from etbench.sweep.lease import LEASE_FILE, DriverLease, LeaseHeld


def _lease(tmp_path: Path, ttl: float = 0.8) -> DriverLease:
    return DriverLease(resolve_storage(tmp_path), "g", ttl_s=ttl, progress=False)


def _write_holder(tmp_path: Path, **holder: object) -> Path:
    path = tmp_path / "g" / LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": "raysubmit_x", "token": "old",
                                "started_unix": time.time() - 500, "heartbeat_unix": time.time(), "ttl_s": 60,
                                **holder}))
    return path


def test_a_second_driver_waits_then_refuses_while_the_first_beats(tmp_path: Path) -> None:
    first = _lease(tmp_path)
    with first:
        t0 = time.monotonic()
        with pytest.raises(LeaseHeld) as err:
            _lease(tmp_path).acquire()
        waited = time.monotonic() - t0
        msg = str(err.value)
        assert f"pid {first.me['pid']}" in msg and socket.gethostname() in msg and "ray job stop" in msg, msg
        assert waited >= 0.8 * 1.5 - 0.05  # waited out a full TTL and a half: the first kept beating
        assert json.loads((tmp_path / "g" / LEASE_FILE).read_text())["token"] == first.me["token"]
    assert not (tmp_path / "g" / LEASE_FILE).exists()  # released on exit
    with _lease(tmp_path):  # free again
        pass


def test_a_stale_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    path = _write_holder(tmp_path, heartbeat_unix=time.time() - 120)
    t0 = time.monotonic()
    with _lease(tmp_path, ttl=60) as lease:
        assert time.monotonic() - t0 < 5
        assert json.loads(path.read_text())["token"] == lease.me["token"]


def test_a_lease_whose_driver_died_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = _write_holder(tmp_path, host=socket.gethostname(), pid=dead.pid)  # heartbeat fresh, process gone
    t0 = time.monotonic()
    with _lease(tmp_path, ttl=60) as lease:
        assert time.monotonic() - t0 < 5
        assert json.loads(path.read_text())["token"] == lease.me["token"]


def test_a_driver_that_lost_its_lease_does_not_remove_the_new_holders(tmp_path: Path) -> None:
    lease = _lease(tmp_path, ttl=60)
    lease.acquire()
    path = _write_holder(tmp_path, token="someone-else")  # another driver took over (we were thought dead)
    lease.release()
    assert json.loads(path.read_text())["token"] == "someone-else"


def test_a_sweep_refuses_to_run_a_grid_another_driver_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is taken in the prologue every grid passes: a second `etbench sweep run` of the grid on the same
    storage is refused before any trial (no Ray started, no run opened)."""
    import yaml

    from etbench.sweep.runner import run_sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "models": ["et"], "seeds": [0],
                                    "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 32,
                                                      "limit_eval": 16}, "train": {"epochs": 1}}}))
    monkeypatch.setenv("ETBENCH_DRIVER_LEASE_TTL_S", "0.4")
    holder = _lease(tmp_path / "results", ttl=0.4)
    with holder, pytest.raises(LeaseHeld, match=f"pid {holder.me['pid']}"):
        run_sweep(grid, storage=str(tmp_path / "results"), progress=False)
    assert not (tmp_path / "results" / "g" / "trials").exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()
