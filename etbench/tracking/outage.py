"""MLflow as a sink: a tracking-server outage stalls training by seconds and never fails it.

What is an outage (:func:`unreachable`): the server cannot be reached or cannot answer — connection refused or
reset, a connect/read timeout, HTTP 408/429/5xx (a proxy in front of a dead server answers 502-504). Anything else
(a bad parameter, a run that is not active, a local SQLite store's error) is a real error and still raises. Only
HTTP(S) stores are treated as sinks; a local ``sqlite:///`` store has no server to lose.

Budgets (environment variables of the trial process; seconds):

- ``ETBENCH_TRACKING_CALL_TIMEOUT_S`` (5): one MLflow call during training, no client retries (the client's own
  default is 7 retries with backoff, ~4 minutes, per call). A failed flush is tried again at the next checkpoint,
  no sooner than ``ETBENCH_TRACKING_RETRY_S`` (30) later, so a black-holed server costs an epoch at most one timeout.
- ``ETBENCH_TRACKING_START_WAIT_S`` (300): opening the run before the first epoch (its id must be on disk first).
- ``ETBENCH_TRACKING_FINAL_WAIT_S`` (default: the trial's own wall time so far, at least 300): the end of a run
  (missing epochs, summary, artifacts, FINISHED). An outage shorter than the trial, wherever it starts, is over
  before this wait is. After it the trial's results stay complete on disk, ``tracking.json`` records the pending
  FINISHED, and :class:`TrackingPendingError` says so; the next attempt on the folder (a Tune retry,
  ``etbench sweep run --resume``) only syncs the run (:func:`etbench.engine.tracked.run_tracked`).

What waits meanwhile lives on the trial's own storage already: ``metrics.json`` holds every epoch, so the pending
set is "epochs MLflow lacks" (read from the server after an outage: a POST that committed but whose answer was lost
is never logged twice), and a failure handler that cannot reach the server writes the failure to ``tracking.json``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from etbench.errors import EtbenchError

log = logging.getLogger(__name__)
T = TypeVar("T")

CALL_TIMEOUT_ENV = "ETBENCH_TRACKING_CALL_TIMEOUT_S"
RETRY_ENV = "ETBENCH_TRACKING_RETRY_S"
START_WAIT_ENV = "ETBENCH_TRACKING_START_WAIT_S"
FINAL_WAIT_ENV = "ETBENCH_TRACKING_FINAL_WAIT_S"
MIN_FINAL_WAIT_S = 300.0
# the MLflow error codes of an answer that says "not now": 5xx (a proxy's 502 maps to INTERNAL_ERROR), 408, 429
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                   "RESOURCE_EXHAUSTED")


class TrackingUnavailableError(EtbenchError, RuntimeError):
    """The tracking server stayed unreachable for the whole wait this step allows."""


class TrackingPendingError(TrackingUnavailableError):
    """A run trained to the end, its results are complete on disk, but MLflow could not be told (FINISHED pending
    in ``tracking.json``); the next attempt on its folder syncs it without training again."""


def _seconds(env: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(env, default)))
    except ValueError:
        return default


def call_timeout_s() -> float:
    return _seconds(CALL_TIMEOUT_ENV, 5.0)


def retry_s() -> float:
    return _seconds(RETRY_ENV, 30.0)


def start_wait_s() -> float:
    return _seconds(START_WAIT_ENV, 300.0)


def final_wait_s(trial_wall_s: float | None) -> float:
    """The end-of-run wait: ``$ETBENCH_TRACKING_FINAL_WAIT_S``, else as long as the trial ran (at least 300 s)."""
    if os.environ.get(FINAL_WAIT_ENV):
        return _seconds(FINAL_WAIT_ENV, MIN_FINAL_WAIT_S)
    return max(MIN_FINAL_WAIT_S, trial_wall_s or 0.0)


def is_server(uri: str) -> bool:
    """An MLflow tracking server (which can go away), not a local store."""
    return uri.startswith(("http://", "https://"))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by an MLflow client call to a server) means the server could not be reached or
    answered with a transient status — an outage, not a request the server refused."""
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    network = (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, ConnectionError,
               TimeoutError)
    if any(isinstance(e, network) for e in _chain(exc)):
        return True
    if isinstance(exc, MlflowException) and "failed with exception" not in exc.message:  # not a wrapped other error
        return exc.error_code in TRANSIENT_CODES  # the server's (or a proxy's) answer
    return False


_env_lock = threading.RLock()
_env_depth = 0
_env_saved: dict[str, str | None] = {}


@contextmanager
def short_calls(timeout_s: float | None = None) -> Iterator[None]:
    """MLflow HTTP calls inside bounded to one try of ``timeout_s`` (default ``$ETBENCH_TRACKING_CALL_TIMEOUT_S``):
    our own loops retry, never the client's ~4 minutes per call. (mlflow reads these variables at every request;
    they are restored when the outermost block exits.)"""
    global _env_depth
    t = max(1, round(call_timeout_s() if timeout_s is None else timeout_s))
    with _env_lock:
        if _env_depth == 0:
            for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(t))):
                _env_saved[k] = os.environ.get(k)
                os.environ[k] = v
        _env_depth += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_depth -= 1
            if _env_depth == 0:
                for k, old in _env_saved.items():
                    if old is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = old
                _env_saved.clear()


def wait_for(fn: Callable[[], T], budget_s: float, what: str, *, on_retry: Callable[[], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()`` (MLflow calls), tried again while the server is unreachable, for up to ``budget_s`` seconds.
    A real error raises at once; the outage outlasting the budget raises :class:`TrackingUnavailableError`.
    ``on_retry`` runs before every retry (e.g. re-read what the store holds: a timed-out write may have landed)."""
    deadline, delay, warned = time.monotonic() + budget_s, 1.0, False
    while True:
        try:
            with short_calls():
                return fn()
        except Exception as exc:
            if not unreachable(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingUnavailableError(f"MLflow unreachable for {budget_s:.0f} s while {what}: {exc}") from exc
            if not warned:
                log.warning("MLflow unreachable while %s (%s); retrying for up to %.0f s", what, exc, left)
                warned = True
            sleep(min(delay, left))
            delay = min(delay * 2, 30.0)
            if on_retry is not None:
                on_retry()
