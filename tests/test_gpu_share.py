"""Fractional GPUs per worker (issue 28.5): the grid rule, the DeepSpeed refusal, the unchanged config hashes,
admission, ``sweep plan``, and the share reaching Ray Tune's placement group on a loopback node with a fake GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench.admission import NodeType, check_fits, worker_bundle
from etbench.config import ConfigError
from etbench.sweep.grid import GridError, expand, load_grid

BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
        "train": {"epochs": 1, "batch_size": 16}}


def write(tmp: Path, name: str = "g", **over: Any) -> Path:
    spec = {"name": name, "base": BASE, "models": ["et"], "seeds": [0], **over}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- the rule ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("share", "want"), [(1, 1.0), (0.5, 0.5), (0.25, 0.25), (0.2, 0.2), (0.125, 0.125),
                                             (0.3333, 0.3333)])
def test_allowed_shares_imply_use_gpu(tmp_path: Path, share: float, want: float) -> None:
    spec = load_grid(write(tmp_path, resources={"gpus_per_worker": share}))
    assert spec.resources.use_gpu and spec.resources.gpu_share == want
    assert all(t.config.dist.use_gpu for t in expand(spec))


@pytest.mark.parametrize(("share", "why"), [(0.3, "does not divide one GPU evenly"), (0.4, "does not divide"),
                                            (0.75, "does not divide"), (2, "more than one GPU per worker"),
                                            (1.5, "more than one GPU per worker"), (0, "greater than 0"),
                                            (-0.5, "greater than 0")])
def test_other_shares_are_refused_naming_file_field_and_allowed_values(tmp_path: Path, share: float,
                                                                      why: str) -> None:
    path = write(tmp_path, resources={"gpus_per_worker": share})
    with pytest.raises(GridError) as err:
        load_grid(path)
    msg = str(err.value)
    assert str(path) in msg and "resources.gpus_per_worker" in msg and why in msg
    if share > 0:
        assert "allowed: 1 (a whole GPU) or 1/k for a whole k >= 2" in msg


def test_a_share_with_use_gpu_false_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GridError, match="use_gpu is false"):
        load_grid(write(tmp_path, resources={"gpus_per_worker": 0.5, "use_gpu": False}))
    with pytest.raises(GridError, match="may not name CPU or GPU"):
        load_grid(write(tmp_path, resources={"custom": {"GPU": 0.5}}))


@pytest.mark.parametrize("over", [
    {"resources": {"gpus_per_worker": 0.5, "workers": 2}},
    {"resources": {"gpus_per_worker": 0.25}, "base": {**BASE, "dist": {"deepspeed": True}}},
    {"resources": {"gpus_per_worker": 0.5}, "axes": {"dist.deepspeed": [False, True]}},  # one trial of two
])
def test_a_fraction_is_refused_where_deepspeed_needs_a_whole_device(tmp_path: Path, over: dict) -> None:
    path = write(tmp_path, **over)
    with pytest.raises(GridError) as err:
        load_grid(path)
    msg = str(err.value)
    assert str(path) in msg and "resources.gpus_per_worker" in msg and "DeepSpeed" in msg and "whole device" in msg


def test_a_whole_gpu_under_deepspeed_is_fine(tmp_path: Path) -> None:
    spec = load_grid(write(tmp_path, resources={"gpus_per_worker": 1, "workers": 2}))
    assert expand(spec)[0].config.dist.workers == 2


# --- placement only: the science hash does not move -------------------------------------------------------------------
def test_the_share_leaves_every_config_hash_as_it_was(tmp_path: Path) -> None:
    axes = {"model.et.steps": [1, 2]}
    whole = expand(load_grid(write(tmp_path, "whole", resources={"use_gpu": True}, axes=axes)))
    quarter = expand(load_grid(write(tmp_path, "quarter", resources={"gpus_per_worker": 0.25}, axes=axes)))
    assert [t.config_hash for t in quarter] == [t.config_hash for t in whole] and len(whole) == 2


def test_sweep_plan_shows_the_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from etbench.cli import main

    assert main(["sweep", "plan", str(write(tmp_path, resources={"gpus_per_worker": 0.25}))]) == 0
    out = capsys.readouterr().out
    assert "'use_gpu': True, 'gpus_per_worker': 0.25" in out
    assert main(["sweep", "plan", str(write(tmp_path, "plain"))]) == 0
    assert "gpus_per_worker" not in capsys.readouterr().out  # an unset share is not listed


# --- admission and the Tune bundles ---------------------------------------------------------------------------------
def test_admission_counts_fractional_gpus(tmp_path: Path) -> None:
    cfg = expand(load_grid(write(tmp_path, resources={"gpus_per_worker": 0.25})))[0].config
    node = NodeType("node 10.0.0.1", {"CPU": 8.0, "GPU": 1.0}, 1, True)
    assert worker_bundle(cfg, gpus=0.25) == {"CPU": 1.0, "GPU": 0.25}
    assert node.holds(worker_bundle(cfg, gpus=0.25)) == 4 and node.holds(worker_bundle(cfg)) == 1
    assert NodeType("n", {"CPU": 8.0, "GPU": 1.0}, 1, True).holds(worker_bundle(cfg, gpus=0.3333)) == 3
    check_fits(cfg, [node], gpus=0.25)
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, [NodeType("node 10.0.0.1", {"CPU": 8.0}, 1, True)], gpus=0.25)
    assert "gpus_per_worker 0.25" in str(err.value) and "one worker needs {CPU: 1, GPU: 0.25}" in str(err.value)


def test_trial_and_tuning_bundles_carry_the_share(tmp_path: Path) -> None:
    from etbench.sweep.runner import _trial_payload, trial_resources
    from etbench.sweep.tune_stage import _resources

    spec = load_grid(write(tmp_path, resources={"gpus_per_worker": 0.25, "custom": {"slot": 1}}))
    p = _trial_payload(expand(spec)[0], spec, "sqlite:///x.db", "g", tmp_path / "r", False, None)
    assert trial_resources({"trial": p}).bundles == [{"CPU": 1.0, "GPU": 0.25, "slot": 1.0}]
    assert _resources(spec) == {"CPU": 1.0, "GPU": 0.25, "slot": 1.0}  # custom resources too, like plain trials


# --- on Ray: two half-GPU trials at once on a one-GPU node ---------------------------------------------------------
def test_two_half_gpu_trials_run_together_on_one_fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid's share reaches each Tune trial's placement group (its bundle and the resources Ray assigned to the
    trial), and a node with one (fake) GPU runs two 0.5-GPU trials at the same time: each trial waits until both
    have started, so with whole-GPU bundles the first would time out instead."""
    import ray

    from etbench.ray_local import init_local_ray
    from etbench.storage import resolve_storage
    from etbench.sweep import runner
    from etbench.sweep.trial import SweepResult

    spec = load_grid(write(tmp_path, resources={"gpus_per_worker": 0.5}, seeds=[0, 1], max_concurrent_trials=2))
    trials = expand(spec)
    st = resolve_storage(str(tmp_path / "results"))
    payloads = [runner._trial_payload(t, spec, "sqlite:///unused.db", "g", st, False, None) for t in trials]
    seen = tmp_path / "seen"
    seen.mkdir()
    folder = str(seen)

    def probe(config: dict[str, Any]) -> dict[str, Any]:  # stands in for the trial (which would need CUDA)
        import json as _json
        import time as _time
        from pathlib import Path as _Path

        import ray as _ray
        from ray.util import get_current_placement_group

        h = config["trial"]["config_hash"]
        (_Path(folder) / f"{h}.started").touch()
        deadline = _time.monotonic() + 25
        while len(list(_Path(folder).glob("*.started"))) < 2 and _time.monotonic() < deadline:
            _time.sleep(0.05)
        (_Path(folder) / f"{h}.json").write_text(_json.dumps({
            "together": len(list(_Path(folder).glob("*.started"))) == 2,
            "bundles": get_current_placement_group().bundle_specs,
            "assigned": _ray.get_runtime_context().get_assigned_resources(),
            "gpu_ids": [str(i) for i in _ray.get_gpu_ids()]}))
        return {"status": "finished", "config_hash": h}

    monkeypatch.setattr(runner, "_tune_trainable", probe)
    init_local_ray("127.0.0.2", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        res = SweepResult(spec.name, "g", "sqlite:///unused.db", tmp_path / "results", planned=2)
        runner._run_with_tune(spec, payloads, st, None, res, progress=False)
    finally:
        ray.shutdown()
    assert sorted(res.finished) == sorted(t.config_hash for t in trials) and not res.failed
    for t in trials:
        got = json.loads((seen / f"{t.config_hash}.json").read_text())
        assert got["bundles"] == [{"CPU": 1.0, "GPU": 0.5}]
        assert got["assigned"] == {"CPU": 1.0, "GPU": 0.5}
        assert got["gpu_ids"] == ["0"]  # the one GPU, shared
        assert got["together"], "the two 0.5-GPU trials did not run at the same time"
