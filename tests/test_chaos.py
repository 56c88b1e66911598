"""Chaos on a loopback cluster (issue 23): a grid loses its driver, a node and its tracking server, and nothing is
lost, run twice or left open.

The cluster (:mod:`etbench.testing.loopback_cluster`): head 127.0.0.2 in this mount namespace, a worker node
127.0.0.3 in its own (a private tmpfs over the cluster folder and ``/tmp/ray``, only ``shared/`` in common), an
MLflow server reached through a TCP proxy the test can black-hole. The grid: four one-worker trials pinned to the
worker node, checkpoint every epoch, the project's default retries (grid ``max_failures`` 1). Faults, each injected
while a trial is mid-run after a checkpoint:

1. the sweep driver is SIGKILLed (its trial actors die with it) and the grid re-submitted with ``--resume``;
2. the worker node is SIGKILLed and started again 10 s later (Ray Tune retries the trials it held);
3. the tracking server is black-holed (connections accepted, never answered) for :data:`BLACKHOLE_S` and then
   restarted on the same store.

Oracle, from the store and the shared trial folders alone (:func:`etbench.testing.chaos.audit`): exactly one
FINISHED run per planned config hash, none left RUNNING, every other run closed with a reason, each FINISHED run's
per-epoch validation history holds every epoch once and equals the trial's ``metrics.json``, and a trial that was
interrupted ends bit-identical to the same config trained once without interruption.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench.testing.chaos import audit
from etbench.testing.loopback_cluster import WORKER_SLOT, LoopbackCluster, can_run, loopback_cluster

pytestmark = [pytest.mark.slow, pytest.mark.skipif(can_run() is not None, reason=str(can_run()))]

EPOCHS = 6
BLACKHOLE_S = 30  # `etbench bench chaos` holds the server for 90 s
GRID = {"name": "chaos", "models": ["et"], "seeds": [0], "max_concurrent_trials": 2,
        "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 1024, "limit_eval": 32},
                 "train": {"epochs": EPOCHS, "batch_size": 64, "lr": 0.003, "eval_trace_samples": 2,
                           "checkpoint_every": 1}},
        "axes": {"model.et.steps": [1, 2, 3, 4]},
        "resources": {"workers": 1, "cpus_per_worker": 1.0, "custom": {WORKER_SLOT: 1}}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    with loopback_cluster(proxy=True, prefix="etbc-") as cl:
        yield cl


def progress(trials: Path) -> dict[str, tuple[int, bool]]:
    """Config hash → (latest checkpointed epoch, finished) of every trial folder on the shared storage."""
    out = {}
    for folder in trials.glob("*"):
        retained = folder / "checkpoints" / "retained.json"
        latest = json.loads(retained.read_text()).get("latest", 0) if retained.exists() else 0
        out[folder.name] = (int(latest), (folder / "summary.json").exists())
    return out


def wait_for(what: str, cond: Callable[[], Any], cl: LoopbackCluster, sid: str, timeout: float = 300) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        status = cl.status(sid)
        assert status in ("PENDING", "RUNNING"), f"job {status} before {what}:\n{cl.logs(sid)[-4000:]}"
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{cl.logs(sid)[-4000:]}")


def mid_trial(trials: Path, after: dict[str, tuple[int, bool]] | None = None) -> Callable[[], list[str]]:
    """Trials with a checkpoint newer than in ``after`` and no final summary yet: a fault now hits a trial mid-run."""
    def cond() -> list[str]:
        before = after or {}
        return [h for h, (epoch, done) in progress(trials).items()
                if epoch >= 1 and not done and epoch > before.get(h, (0, False))[0]]
    return cond


def test_a_grid_survives_driver_node_and_tracking_server_loss(cluster: LoopbackCluster, tmp_path: Path) -> None:
    from etbench.config import RunConfig
    from etbench.engine.run import run_single
    from etbench.sweep.grid import expand, load_grid

    grid = cluster.base / "job" / "chaos.yaml"  # read by the driver, which runs on the head
    grid.write_text(yaml.safe_dump(GRID))
    trials = cluster.shared / "chaos" / "trials"
    planned = {t.config_hash: t for t in expand(load_grid(grid))}

    # 1. driver lost mid-trial, grid resubmitted with --resume
    sid = cluster.submit(cluster.sweep_args(grid))
    hit_driver = wait_for("first checkpoint", mid_trial(trials), cluster, sid)
    cluster.kill_driver(sid)
    assert cluster.status(sid) in ("FAILED", "STOPPED")
    before = progress(trials)
    sid = cluster.submit(cluster.sweep_args(grid, "--resume"))

    # 2. the worker node lost mid-trial and back 10 s later: Tune retries the trials it held
    hit_node = wait_for("a checkpoint after --resume", mid_trial(trials, before), cluster, sid)
    cluster.kill_worker()
    time.sleep(10)
    cluster.start_worker()

    # 3. the tracking server stops answering while a trial runs, then restarts on the same store
    hit_mlflow = wait_for("a trial running after the node loss", mid_trial(trials, progress(trials)), cluster, sid)
    cluster.proxy.set_mode("blackhole")
    time.sleep(BLACKHOLE_S)
    cluster.restart_mlflow()
    cluster.proxy.set_mode("pass")

    status = cluster.wait(sid, 600)
    logs = cluster.logs(sid)
    assert status == "SUCCEEDED", logs[-5000:]
    result = audit(cluster.direct_uri, "chaos", {h: EPOCHS for h in planned}, trials)
    assert result.problems == [], (result.as_dict(), logs[-3000:])
    assert result.finished == len(planned) == 4
    for h in {*hit_driver, *hit_node}:  # every trial a fault hit ran again and continued its own run
        assert result.attempts.get(h, 1) >= 2, (h, result.attempts)
    assert hit_mlflow

    # an interrupted trial ends bit-identical to the same config trained once, uninterrupted
    import torch

    h = sorted(hit_node)[0]
    cfg = RunConfig.model_validate(planned[h].config.model_dump(mode="json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial (dist.cpus_per_worker 1): the same reductions, bit for bit
    try:
        ref = run_single(cfg, tmp_path / "ref", progress=False).state.history
    finally:
        torch.set_num_threads(threads)
    got = json.loads((trials / h / "metrics.json").read_text())
    for key in ("train/loss", "val/loss"):
        assert [r[key] for r in got] == [r[key] for r in ref], key
