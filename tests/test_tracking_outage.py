"""Issue 23 item 5: a tracking-server outage is survivable (cluster-2 review, finding 10).

A real MLflow server (SQLite store) behind :class:`etbench.testing.tcp_proxy.TcpProxy`, which the test makes refuse,
black-hole, or mute (requests reach the server, answers are lost) while a tiny digits trial trains. Oracle, from the
server's store: the trial finishes, its run is FINISHED, and its per-epoch history holds each epoch exactly once and
equals the trial's ``metrics.json``; a failure while the server is gone surfaces the training error (not a tracking
error), and the failure waits in ``tracking.json`` for the next attempt; a server gone past the end-of-run wait
leaves the results complete on disk, and the next attempt only syncs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from test_run_identity import BASE, NodeLost, _grid, assert_history_is_metrics_json

from etbench.sweep import runner
from etbench.testing.tcp_proxy import Mode, TcpProxy, free_port
from etbench.tracking import schema as S
from etbench.tracking.outage import TrackingPendingError, unreachable

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One MLflow server for the module (its port); stopped by its own process group."""
    if not (BIN / "mlflow").exists():
        pytest.skip(f"mlflow CLI not found in {BIN}")
    d, port = tmp_path_factory.mktemp("mlflow"), free_port()
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture started (server + its uvicorn worker); a
        proc.wait(timeout=15)  # throw-away store, nothing to shut down cleanly
        log.close()


@pytest.fixture
def proxy(server: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """The server behind a switchable proxy; MLflow calls bounded to 1 s, a failed flush retried at the next
    checkpoint (the defaults are 5 s and 30 s: a tiny run's epochs take well under a second)."""
    monkeypatch.setenv("ETBENCH_TRACKING_CALL_TIMEOUT_S", "1")
    monkeypatch.setenv("ETBENCH_TRACKING_RETRY_S", "0")
    monkeypatch.setenv("ETBENCH_TRACKING_FINAL_WAIT_S", "20")
    with TcpProxy(server) as p:
        yield p


def _at_epochs(monkeypatch: pytest.MonkeyPatch, plan: dict[int, Any]) -> None:
    """Run ``plan[k]()`` right after epoch ``k`` (1-based) is written to metrics.json, before its checkpoint and
    its flush to MLflow."""
    from etbench.engine import run

    real, calls = run.write_metrics, {"n": 0}

    def hooked(history: list[dict[str, float]], out: Path) -> None:
        real(history, out)
        calls["n"] += 1
        if calls["n"] in plan:
            plan[calls["n"]]()

    monkeypatch.setattr(run, "write_metrics", hooked)


def _payload(tmp: Path, uri: str, name: str, epochs: int = 3) -> dict[str, Any]:
    """The trial of a one-config grid ``name`` (also its experiment: one per test on the module's server)."""
    from etbench.sweep.grid import expand, load_grid

    spec = load_grid(_grid(tmp, name, base={**BASE, "train": {**BASE["train"], "epochs": epochs}}))
    return runner._trial_payload(expand(spec)[0], spec, uri, name, tmp / "results", False, None)


def _mode(p: TcpProxy, mode: Mode) -> Any:
    return lambda: p.set_mode(mode)


def _run(uri: str, run_id: str) -> Any:
    return MlflowClient(uri).get_run(run_id)


def test_a_trial_survives_an_outage_and_logs_each_epoch_once(tmp_path: Path, proxy: TcpProxy,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Five epochs; epoch 2's write reaches the server but its answer is lost (mute), epoch 3 finds the server
    refusing, epoch 4 black-holed; it answers again for epoch 5. The trial finishes without waiting minutes, the
    run is FINISHED with each epoch once (epoch 2 not re-sent after the lost answer) equal to metrics.json."""
    uri = proxy.url
    payload = _payload(tmp_path, uri, "outage", epochs=5)
    out = Path(payload["out"])
    held: dict[int, list[int]] = {}

    def seen(k: int) -> Any:  # what the server holds once the proxy passes again (read around the proxy)
        return lambda: held.__setitem__(k, sorted(
            m.step for m in MlflowClient(f"http://127.0.0.1:{proxy.target[1]}").get_metric_history(
                json.loads((out / "tracking.json").read_text())["run_id"], "train/loss")))

    _at_epochs(monkeypatch, {2: _mode(proxy, "mute"), 3: lambda: (seen(3)(), proxy.set_mode("refuse")),
                             4: _mode(proxy, "blackhole"), 5: _mode(proxy, "pass")})
    t0 = time.monotonic()
    assert runner.run_trial(payload)["status"] == "finished"
    took = time.monotonic() - t0
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    run = _run(uri, run_id)
    assert run.info.status == "FINISHED" and S.TAG_ERROR not in run.data.tags
    assert held[3] == [1, 2]  # epoch 2's write committed although its answer never came
    assert_history_is_metrics_json(uri, run_id, out)  # each of the 5 epochs once: epoch 2 was not sent again
    assert len(json.loads((out / "metrics.json").read_text())) == 5
    assert "cost/wall_s" in run.data.metrics and json.loads((out / "tracking.json").read_text())["pending"] is None
    assert took < 60, took  # three failed flushes of ~1 s each, not the client's minutes of retries


def test_the_training_error_surfaces_when_the_server_is_gone(tmp_path: Path, proxy: TcpProxy,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial dies in epoch 2 while the server is gone: the trial's own error surfaces (not a tracking error,
    not after minutes), the failure waits in tracking.json; the next attempt, with the server back, re-attaches
    the same run and finishes it with each epoch once."""
    uri = proxy.url
    payload = _payload(tmp_path, uri, "handler")
    out = Path(payload["out"])

    def die() -> None:
        proxy.set_mode("blackhole")
        raise NodeLost("lost the node in epoch 2")

    with monkeypatch.context() as m:
        _at_epochs(m, {2: die})
        t0 = time.monotonic()
        with pytest.raises(NodeLost):
            runner.run_trial(payload)
        assert time.monotonic() - t0 < 60
    ident = json.loads((out / "tracking.json").read_text())
    assert ident["pending"]["status"] == "FAILED" and "NodeLost" in ident["pending"]["error"]
    proxy.set_mode("pass")
    assert _run(uri, ident["run_id"]).info.status == "RUNNING"  # the server was never told
    assert runner.run_trial(payload)["status"] == "finished"  # the retry
    run = _run(uri, ident["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[S.TAG_ATTEMPTS] == "2"
    assert json.loads((out / "tracking.json").read_text())["pending"] is None
    assert_history_is_metrics_json(uri, ident["run_id"], out)


def test_a_server_gone_past_the_final_wait_is_synced_by_the_next_attempt(tmp_path: Path, proxy: TcpProxy,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server refuses from the last epoch on, past the end-of-run wait: the trial raises a clear
    TrackingPendingError, its results complete on disk and FINISHED pending; the next attempt (a Tune retry or
    `--resume`) trains nothing and closes the run FINISHED with every epoch once."""
    monkeypatch.setenv("ETBENCH_TRACKING_FINAL_WAIT_S", "2")
    uri = proxy.url
    payload = _payload(tmp_path, uri, "final")
    out = Path(payload["out"])
    with monkeypatch.context() as m:
        _at_epochs(m, {3: _mode(proxy, "refuse")})
        with pytest.raises(TrackingPendingError, match="--resume"):
            runner.run_trial(payload)
    ident = json.loads((out / "tracking.json").read_text())
    assert ident["pending"]["status"] == "FINISHED" and (out / "summary.json").exists()
    proxy.set_mode("pass")
    assert _run(uri, ident["run_id"]).info.status == "RUNNING"
    rows = (out / "metrics.json").read_text()

    def no_training(*a: Any, **k: Any) -> None:
        raise AssertionError("the sync trained again")

    from etbench.engine import tracked

    with monkeypatch.context() as m:
        m.setattr(tracked, "run_single", no_training)
        assert runner.run_trial(payload)["status"] == "finished"
    assert (out / "metrics.json").read_text() == rows
    run = _run(uri, ident["run_id"])
    assert run.info.status == "FINISHED" and "best/epoch" in run.data.metrics
    assert run.data.metrics["cost/wall_s"] == json.loads((out / "summary.json").read_text())["cost"]["wall_s"]
    assert json.loads((out / "tracking.json").read_text())["pending"] is None
    assert_history_is_metrics_json(uri, ident["run_id"], out)


def test_rank0_epochs_held_for_a_checkpoint_wait_out_an_outage(tmp_path: Path, proxy: TcpProxy) -> None:
    """The Ray Train path's tracker (``commit_every``: an epoch goes out once a checkpoint covers it): epochs that
    a flush could not send stay waiting and go out with the first flush that reaches the server; the end adds the
    rest; each epoch once."""
    from etbench.config import resolve_run_config
    from etbench.tracking.mlflow_log import RunTracker

    rows = [{"epoch": float(e), "train/loss": 1.0 / (e + 1), "val/mse_masked": 0.5 - 0.01 * e} for e in range(6)]
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    tracker = RunTracker(proxy.url, "commit", "r")
    run_id = tracker.start(resolve_run_config(BASE), grid="commit")
    tracker.commit_every, tracker.identity_dir = 2, tmp_path
    modes: list[Mode] = ["pass", "pass", "blackhole", "refuse", "pass", "pass"]
    for e, row in enumerate(rows):
        proxy.set_mode(modes[e])
        tracker.log_epoch(e, row)  # epoch e's row; the epochs up to (e // 2) * 2 are checkpointed
    proxy.set_mode("pass")
    client = MlflowClient(proxy.url)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]
    tracker.log_history(rows)
    tracker.finish("FINISHED")
    for key in ("train/loss", "val/mse_masked"):
        hist = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert len(client.get_metric_history(run_id, key)) == 6 and hist == {e + 1: r[key] for e, r in
                                                                             enumerate(rows)}


def test_a_create_whose_answer_was_lost_opens_no_second_run(tmp_path: Path, proxy: TcpProxy,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's creation reaches the server but its answer is lost: the retry finds that run (by its open token)
    instead of creating a second one."""
    from etbench.config import resolve_run_config
    from etbench.engine.tracked import TrackingSpec, start_tracking

    real, calls = MlflowClient.create_run, []

    def muted_once(self: MlflowClient, *a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            return real(self, *a, **k)
        proxy.set_mode("mute")
        try:
            return real(self, *a, **k)
        finally:
            proxy.set_mode("pass")

    monkeypatch.setattr(MlflowClient, "create_run", muted_once)
    spec = TrackingSpec(uri=proxy.url, experiment="create", grid="create", run_name="r")
    tracker = start_tracking(spec, resolve_run_config(BASE), tmp_path / "t")
    monkeypatch.undo()
    client = MlflowClient(proxy.url)
    runs = client.search_runs([client.get_experiment_by_name("create").experiment_id])
    assert len(calls) == 1 and [r.info.run_id for r in runs] == [tracker.run_id]
    assert json.loads((tmp_path / "t" / "tracking.json").read_text())["run_id"] == tracker.run_id


def test_what_counts_as_an_outage() -> None:
    """Connection errors, timeouts and transient statuses are an outage; a request the server refused is not."""
    import requests
    from mlflow.exceptions import MlflowException, RestException

    def wrapped(inner: Exception) -> MlflowException:
        try:
            try:
                raise inner
            except Exception as e:
                raise MlflowException(f"API request to x failed with exception {e}")  # noqa: B904 (as rest_utils)
        except MlflowException as outer:
            return outer

    assert unreachable(wrapped(requests.ConnectionError("refused")))
    assert unreachable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503"}))
    assert unreachable(MlflowException("API request to endpoint x failed with error code 502 != 200"))
    assert not unreachable(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad param"}))
    assert not unreachable(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not unreachable(wrapped(ValueError("not a network error")))
    assert not unreachable(ValueError("x"))
