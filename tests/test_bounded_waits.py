"""Bounded waits (cluster-2 review, finding 5): a distributed trial whose workers never get their resources fails
with the numbers after ``$ETBENCH_TRAIN_START_TIMEOUT_S`` × (1 + ``$ETBENCH_TRAIN_START_RETRIES``) instead of Ray
Train V2's default of retrying its 60 s worker-group start forever (``controller_failure_limit`` -1)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
import ray.train
import ray.train.torch
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from etbench.config import ConfigError, resolve_run_config
from etbench.engine import launch as L
from etbench.engine.worker import SUMMARY_KEY

TINY = {"task": {"dataset": "digits", "limit_train": 64, "limit_eval": 32}, "train": {"epochs": 1, "batch_size": 32}}


def _cfg(cpus: float = 3.0) -> Any:
    return resolve_run_config({**TINY, "dist": {"workers": 2, "cpus_per_worker": cpus, "deepspeed": True}})


class FakeTrainer:
    """Captures what ``fit`` hands Ray Train, and the start-timeout variable in this process while it runs."""

    made: ClassVar[list[FakeTrainer]] = []
    raises: ClassVar[BaseException | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kwargs, self.env_in_fit = kwargs, None
        FakeTrainer.made.append(self)

    def fit(self) -> Any:
        self.env_in_fit = os.environ.get(L.RAY_START_TIMEOUT)
        if FakeTrainer.raises is not None:
            raise FakeTrainer.raises
        return type("Result", (), {"metrics": {SUMMARY_KEY: json.dumps({"ok": 1})}})()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeTrainer]:
    for k in (L.ENV_START_TIMEOUT, L.ENV_START_RETRIES, L.RAY_START_TIMEOUT):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(L, "ensure_ray", lambda *a, **k: False)
    FakeTrainer.made, FakeTrainer.raises = [], None
    return FakeTrainer


def test_the_trainer_gets_a_bounded_failure_config_and_start_timeout(fake: type[FakeTrainer], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg()
    assert L.fit(cfg, tmp_path / "a", admitted=True, progress=False) == {"ok": 1}
    t = fake.made[-1]
    failure = t.kwargs["run_config"].failure_config
    assert (failure.max_failures, failure.controller_failure_limit) == (cfg.dist.max_failures, 1)  # Ray's: -1
    assert t.env_in_fit == "900" and L.RAY_START_TIMEOUT not in os.environ  # set for fit() only
    assert t.kwargs["scaling_config"].resources_per_worker == {"CPU": 3.0}
    monkeypatch.setenv(L.ENV_START_TIMEOUT, "42")
    monkeypatch.setenv(L.ENV_START_RETRIES, "0")
    L.fit(cfg, tmp_path / "b", admitted=True, progress=False)
    assert fake.made[-1].env_in_fit == "42"
    assert fake.made[-1].kwargs["run_config"].failure_config.controller_failure_limit == 0
    monkeypatch.setenv(L.ENV_START_RETRIES, "-1")
    with pytest.raises(ConfigError, match="ETBENCH_TRAIN_START_RETRIES='-1'"):
        L.fit(cfg, tmp_path / "c", admitted=True, progress=False)


def test_a_start_that_timed_out_every_try_fails_with_the_numbers(fake: type[FakeTrainer], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(L.ENV_START_TIMEOUT, "42")
    monkeypatch.setenv(L.ENV_START_RETRIES, "3")
    fake.raises = ray.train.ControllerError(WorkerGroupStartupTimeoutError(num_workers=2))
    with pytest.raises(L.WorkerGroupNeverStartedError) as err:
        L.fit(_cfg(), tmp_path / "a", admitted=True, progress=False)
    assert "could not start 2 workers × {CPU: 3} within 42 s, 4 time(s)" in str(err.value)
    other = ray.train.ControllerError(RuntimeError("controller bug"))
    fake.raises = other
    with pytest.raises(ray.train.ControllerError) as err2:  # any other controller failure stays as it was
        L.fit(_cfg(), tmp_path / "b", admitted=True, progress=False)
    assert err2.value is other


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_unplaceable_trial_on_a_real_ray_fails_instead_of_waiting(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers of 1000 CPUs each on a local Ray (admission bypassed, as when the nodes it counted vanish)."""
    import ray

    from etbench.sweep.trial import init_ray

    monkeypatch.setenv(L.ENV_START_TIMEOUT, "3")
    monkeypatch.setenv(L.ENV_START_RETRIES, "0")
    started = init_ray(None, False)
    try:
        with pytest.raises(L.WorkerGroupNeverStartedError, match=r"2 workers × \{CPU: 1000\} within 3 s, 1 time") \
                as err:  # with Ray's defaults (60 s per start, retried forever) this hangs until the test's timeout
            L.fit(_cfg(1000.0), tmp_path / "run", admitted=True, progress=False)
        assert "timed out after 3.0 seconds" in str(err.value.__cause__)  # the controller actor read our timeout
    finally:
        if started:
            ray.shutdown()
