"""One driver per grid: a lease on the grid's shared storage (the cluster-2 review, finding 13).

Two ``etbench sweep run GRID --resume`` drivers on one cluster (a re-applied RayJob, a user re-submitting because
``ray job submit`` lost its log stream) would attach the same live runs and train the same config hashes into the
same trial folders: clobbered checkpoints, interleaved metrics. The first driver writes
``<storage>/<grid>/driver.lease`` (who: host, PID, Ray job id; when: start and a heartbeat refreshed every
``ttl_s / 4`` seconds) and removes it when it ends. A second driver:

- takes the lease over at once when it is stale (no heartbeat for ``ttl_s``) or its holder is a dead process on
  this host (a SIGKILLed driver whose job is re-submitted on the same head);
- otherwise waits up to ``ttl_s + ttl_s / 2`` for it to go stale (a driver killed on another host stops beating),
  then refuses with the holder's details and what to do.

On a POSIX storage the lease is created with ``O_EXCL`` (two drivers starting at once: one wins); a URI storage
(S3, GCS) has no exclusive create, so the lease there is written and read back — it narrows the window, not
closes it (cluster/README.md says so).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.storage import Storage, exists, read_text, remove, write_text
from etbench.sweep.trial import SweepError

LEASE_FILE = "driver.lease"
TTL_ENV = "ETBENCH_DRIVER_LEASE_TTL_S"  # seconds without a heartbeat after which a lease is stale (default 60)


def _ttl() -> float:
    return float(os.environ.get(TTL_ENV, "60"))


class LeaseHeld(SweepError):
    """Another driver is running this grid on this storage."""


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("RAY_JOB_ID") or
            json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get(
                "etbench_submission"), "token": uuid.uuid4().hex}


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (or is another process reusing the PID: its start
    time is after the lease's)."""
    if holder.get("host") != socket.gethostname():
        return False
    import psutil

    try:
        p = psutil.Process(int(holder.get("pid", -1)))
    except (psutil.NoSuchProcess, ValueError):
        return True
    return p.create_time() > float(holder.get("started_unix", 0)) + 1


@dataclass
class DriverLease:
    """The lease of one grid's driver; use as a context manager (see the module docstring)."""

    storage: Storage
    grid: str
    ttl_s: float = field(default_factory=_ttl)
    progress: bool = True
    me: dict[str, Any] = field(default_factory=_me)
    _stop: threading.Event = field(default_factory=threading.Event)
    _beat: threading.Thread | None = None

    @property
    def target(self) -> str:
        return self.storage.join(self.grid, LEASE_FILE) if self.storage.is_uri else \
            str(Path(self.storage.local) / self.grid / LEASE_FILE)

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(read_text(self.target)) if exists(self.target) else None
        except (OSError, ValueError):
            return None  # half-written or vanished: treated as free (the write-back check settles races)

    def _write(self, exclusive: bool) -> bool:
        body = json.dumps({**self.me, "started_unix": self.me.setdefault("started_unix", time.time()),
                           "heartbeat_unix": time.time(), "ttl_s": self.ttl_s})
        if self.storage.is_uri:
            write_text(self.target, body)
            return (self.holder() or {}).get("token") == self.me["token"]
        path = Path(self.target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(body)
            return True
        tmp = path.with_name(f"{LEASE_FILE}.{self.me['token']}")
        tmp.write_text(body)
        os.replace(tmp, path)
        return (self.holder() or {}).get("token") == self.me["token"]

    def _why_free(self, h: dict[str, Any]) -> str | None:
        age = time.time() - float(h.get("heartbeat_unix", 0))
        if age > float(h.get("ttl_s", self.ttl_s)):
            return f"no heartbeat for {age:.0f} s"
        if _dead_here(h):
            return f"its process {h.get('pid')} on this host is gone"
        return None

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Move the stale lease out of the way — only that one: a fresh lease another driver wrote since we read
        the stale one is put back (POSIX; on a URI storage the stale lease is deleted)."""
        if self.storage.is_uri:
            remove(self.target)
            return
        path = Path(self.target)
        grave = path.with_name(f"{LEASE_FILE}.stale-{self.me['token']}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(grave.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != stale.get("token"):
            try:
                os.link(grave, path)  # no-clobber: fails if yet another lease appeared meanwhile
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)

    def acquire(self) -> None:
        deadline = time.time() + self.ttl_s * 1.5
        waited = False
        while True:
            h = self.holder()
            if h is None:
                if self._write(exclusive=True):
                    break
                continue  # another driver created it between our look and our create: look again
            why = self._why_free(h)
            if why is not None:
                if self.progress:
                    print(f"grid {self.grid}: taking over the driver lease of {h.get('host')} pid {h.get('pid')} "
                          f"({why})", flush=True)
                self._take_over(h)
                continue
            if time.time() > deadline:
                raise LeaseHeld(
                    f"grid {self.grid} is being run by another driver: host {h.get('host')}, pid {h.get('pid')}, Ray "
                    f"job {h.get('job')}, started {time.ctime(float(h.get('started_unix', 0)))}, heartbeat "
                    f"{time.time() - float(h.get('heartbeat_unix', 0)):.0f} s ago ({self.target}). Two drivers would "
                    f"train the same trials into the same folders. Stop that job (`ray job stop {h.get('job')}`) or "
                    f"wait for it; a lease whose driver died frees itself {self.ttl_s:.0f} s after its last "
                    f"heartbeat")
            if self.progress and not waited:
                print(f"grid {self.grid}: another driver holds {self.target} (host {h.get('host')}, pid "
                      f"{h.get('pid')}); waiting up to {self.ttl_s * 1.5:.0f} s for it to end or go stale",
                      flush=True)
                waited = True
            time.sleep(min(2.0, self.ttl_s / 10))
        self._beat = threading.Thread(target=self._heartbeat, name="etbench-driver-lease", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if (self.holder() or {}).get("token") != self.me["token"]:
                    return  # taken over (we were thought dead): the other driver owns it now
                self._write(exclusive=False)
            except OSError:
                pass  # a storage hiccup: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        try:
            if (self.holder() or {}).get("token") == self.me["token"]:
                remove(self.target)
        except OSError:
            pass

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
