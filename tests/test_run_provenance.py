"""Issue 23 item 7 (review findings 9, 14): a run records the code, host, device and precision regime of the process
that trained it, observed there, not stamped by the submitter."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from etbench.config import RunConfig, TrainConfig
from etbench.engine.provenance import AUTOCAST_BF16, BF16, FP32, precision, trains_bf16
from etbench.engine.tracked import TrackingSpec, run_tracked, start_tracking
from etbench.tracking import schema as S
from etbench.tracking.provenance import PACKAGE_DIR, code_hash, cpu_model, source_hash

TINY = {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16, "patch": 4},
        "model": {"name": "et", "et": {"steps": 1}},
        "train": {"epochs": 1, "batch_size": 32, "eval_trace_samples": 1, "device": "cpu"}}


def _oracle(package: Path) -> str:
    """The documented recipe, written out again: sha256 over (relative path, NUL, 8-byte size, bytes) of every .py
    file under the package, sorted by relative path; 16 hex characters."""
    files = sorted((p.relative_to(package).as_posix(), p.read_bytes()) for p in package.rglob("*.py"))
    h = hashlib.sha256()
    for rel, data in files:
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def test_a_tracked_run_carries_the_provenance_of_the_process_that_trained(tmp_path: Path) -> None:
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    run_tracked(RunConfig.model_validate(TINY), out, TrackingSpec(uri, "prov", "g", "r"), progress=False)
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("prov").experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags[S.TAG_CODE_HASH] == _oracle(PACKAGE_DIR) == code_hash()
    assert tags[S.TAG_DEVICE_NAME] == cpu_model() != ""
    assert tags[S.TAG_HOSTNAME] == socket.gethostname()
    assert tags[S.TAG_NODE_IP]
    assert tags[S.TAG_PRECISION] == FP32
    assert S.TAG_NODES_SPANNED not in tags  # a one-worker run in this process spans no Ray Train workers


def test_a_reattached_run_gets_the_tags_of_the_attempt_that_trains_it(tmp_path: Path) -> None:
    """A retry may run on another node or with other code: re-opening the run re-sets its provenance."""
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    cfg, spec = RunConfig.model_validate(TINY), TrackingSpec(uri, "prov", "g", "r")
    first = start_tracking(spec, cfg, out, tags={S.TAG_HOSTNAME: "node-a", S.TAG_CODE_HASH: "aaaa"})
    again = start_tracking(spec, cfg, out, tags={S.TAG_HOSTNAME: "node-b", S.TAG_CODE_HASH: "bbbb"})
    assert again.attached and again.run_id == first.run_id
    tags = MlflowClient(uri).get_run(first.run_id).data.tags
    assert (tags[S.TAG_HOSTNAME], tags[S.TAG_CODE_HASH]) == ("node-b", "bbbb")


def test_rank_zero_tags_the_run_it_attached(tmp_path: Path) -> None:
    from etbench.engine.worker import _tagged
    from etbench.tracking.mlflow_log import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(uri, "prov", "r")
    tracker.start(RunConfig.model_validate(TINY), grid="g")
    attached: Future[RunTracker] = Future()
    attached.set_result(tracker)
    assert _tagged(attached, {S.TAG_PRECISION: BF16, S.TAG_NODES_SPANNED: "2"}) is tracker
    tags = MlflowClient(uri).get_run(tracker._id()).data.tags
    assert (tags[S.TAG_PRECISION], tags[S.TAG_NODES_SPANNED]) == (BF16, "2")


def test_code_hash_follows_the_source_of_the_imported_package(tmp_path: Path) -> None:
    copy = tmp_path / "etbench"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    t0 = time.perf_counter()
    base = source_hash(copy)
    elapsed = time.perf_counter() - t0
    assert base == _oracle(copy) == source_hash(PACKAGE_DIR)
    assert elapsed < 0.5, elapsed  # ~5 ms on this machine: computed once per process, at the run's start
    (copy / "README.txt").write_text("not source")
    assert source_hash(copy) == base  # only .py files count
    target = copy / "models" / "registry.py"
    target.write_bytes(target.read_bytes() + b"\n# changed\n")
    changed = source_hash(copy)
    assert changed != base and changed == _oracle(copy)
    (copy / "models" / "registry.py").rename(copy / "models" / "registry2.py")  # same bytes, another path
    assert source_hash(copy) not in (base, changed)


@pytest.mark.parametrize(("bf16", "device", "deepspeed", "regime"), [
    (True, "cuda", False, AUTOCAST_BF16),  # one worker on GPU: fp32 weights under bf16 autocast
    (True, "cuda", True, BF16),  # DeepSpeed bf16: bf16 weights, bf16 gradient reduction
    (False, "cuda", False, FP32), (False, "cuda", True, FP32),
    (True, "cpu", False, FP32), (True, "cpu", True, FP32),  # bf16 is ignored on CPU
])
def test_precision_rule(bf16: bool, device: str, deepspeed: bool, regime: str) -> None:
    assert precision(trains_bf16(TrainConfig(bf16=bf16), device), deepspeed) == regime


@pytest.mark.parametrize(("bf16", "use_gpu"), [(True, True), (False, True), (True, False)])
def test_the_backends_decide_as_the_rule(bf16: bool, use_gpu: bool) -> None:
    """What each backend actually does agrees with :func:`trains_bf16` (no GPU needed: the decisions are read,
    not run)."""
    from etbench.engine.backend import PlainBackend
    from etbench.engine.ds_backend import ds_config

    cfg = RunConfig.model_validate({**TINY, "train": {**TINY["train"], "bf16": bf16, "device": "auto"},
                                    "dist": {"use_gpu": use_gpu}})
    device = "cuda" if use_gpu else "cpu"
    assert ds_config(cfg, 2, 4)["bf16"]["enabled"] == trains_bf16(cfg.train, device)
    plain = PlainBackend(torch.nn.Linear(2, 2), cfg.train, 1, torch.device("cpu"))
    plain.device = torch.device(device)  # the autocast decision only; nothing runs on the device
    with warnings.catch_warnings():  # torch.autocast("cuda") warns without a GPU (and builds a disabled one)
        warnings.simplefilter("ignore")
        ctx = plain.autocast()
    autocasts = isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert autocasts == trains_bf16(cfg.train, device)



def test_nodes_spanned_counts_the_distinct_ray_nodes_of_the_group(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One rank over a real (gloo) process group: the gathered node ids are counted; no group, one node."""
    import ray
    import torch.distributed as dist

    from etbench.engine.provenance import nodes_spanned

    assert nodes_spanned() == 1

    class Context:
        def get_node_id(self) -> str:
            return "node-0"

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert nodes_spanned() == 1
    finally:
        dist.destroy_process_group()
