"""Distributed runs: DeepSpeed config, ZeRO 0–3 in a 2-rank gloo harness, and Ray Train fits (equivalence, faults).

The multi-process tests are marked slow (they still run in CI). Every process a test starts is stopped by it: the
harness joins/kills its spawned ranks; the Ray tests give Ray its own temp root (``RAY_TMPDIR``) and afterwards
assert that no process of that cluster is left.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from etbench.config import ConfigError, RunConfig, resolve_run_config
from etbench.engine.ds_backend import checkpoint_descent_steps, ds_config

TINY = {"task": {"dataset": "digits", "limit_train": 128, "limit_eval": 64}, "train": {"epochs": 3, "batch_size": 32}}


def tiny_cfg(**dist: object) -> RunConfig:
    return resolve_run_config({**TINY, "dist": {"workers": 2, **dist}})


# --- fast: configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dist", "field"), [({"zero_stage": 5}, "zero_stage"), ({"workers": 0}, "workers")])
def test_bad_dist_values_are_rejected_naming_the_field(dist: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"dist\.{field}"):
        resolve_run_config({**TINY, "dist": dist})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_gpus_fails_before_any_work(tmp_path: Path) -> None:
    import ray

    from etbench.engine.launch import fit

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        fit(tiny_cfg(use_gpu=True), tmp_path / "run", progress=False)
    assert not ray.is_initialized()
    assert not (tmp_path / "run").exists()


def test_offload_and_checkpointing_combinations_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"dist\.offload needs dist\.zero_stage"):
        ds_config(tiny_cfg(offload=True, use_gpu=True), 2, 16)
    with pytest.raises(ConfigError, match=r"dist\.offload needs dist\.use_gpu"):
        ds_config(tiny_cfg(offload=True, zero_stage=2), 2, 16)
    vit = resolve_run_config({**TINY, "model": {"name": "vit"}, "dist": {"activation_checkpointing": True}})
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        ds_config(vit, 2, 16)


def test_ds_config_follows_the_run_config() -> None:
    cfg = resolve_run_config({**TINY, "train": {"batch_size": 64, "grad_clip": 0.5},
                              "dist": {"workers": 2, "zero_stage": 3, "grad_accum": 2}})
    c = ds_config(cfg, world_size=2, micro_batch=16)
    assert c["train_micro_batch_size_per_gpu"] == 16 and c["gradient_accumulation_steps"] == 2
    assert c["train_batch_size"] == 16 * 2 * 2
    assert c["gradient_clipping"] == 0.5 and c["zero_allow_untested_optimizer"] is True
    assert c["zero_optimization"]["stage"] == 3 and c["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert c["bf16"]["enabled"] is False  # fp32 on CPU
    gpu = resolve_run_config({**TINY, "dist": {"workers": 2, "zero_stage": 3, "use_gpu": True, "offload": True}})
    g = ds_config(gpu, 2, 16)
    assert g["bf16"]["enabled"] is True
    assert g["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert g["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds_config(tiny_cfg(), 2, 16)["gradient_clipping"] == 1.0


@pytest.mark.parametrize("grad_mode", ["analytic", "autograd"])
def test_checkpointed_descent_steps_give_identical_gradients(grad_mode: str) -> None:
    from etbench.models.et_config import ETConfig
    from etbench.models.image import ImageET

    et = ETConfig(dim=16, heads=2, head_dim=8, memories=32, steps=3, grad_mode=grad_mode)
    images, replace = torch.randn(3, 1, 8, 8), torch.rand(3, 16) < 0.5
    grads = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = ImageET((1, 8, 8), 2, et).train()
        if wrap:
            assert checkpoint_descent_steps(model) == 1
        model(images, replace).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-8, msg=n)


def test_one_plain_worker_runs_in_process(tmp_path: Path) -> None:
    import ray

    from etbench.engine.launch import fit

    cfg = resolve_run_config({**TINY, "train": {"epochs": 1, "batch_size": 32}})
    summary = fit(cfg, tmp_path / "run", progress=False)
    assert not ray.is_initialized()
    assert summary["config_hash"] == cfg.hash() and "distributed" not in summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config_hash"] == cfg.hash()


# --- slow: ZeRO 0–3 in one 2-rank gloo harness (no Ray) ---------------------------------------------------------
@pytest.mark.slow
def test_zero_stages_shard_train_identically_and_resume_exactly(tmp_path: Path) -> None:
    from etbench.bench.zero import run_zero_bench

    rep = run_zero_bench(tmp_path, world=2, stages=(0, 1, 2, 3), steps=4, warmup=1, check_resume=True,
                         overrides={**TINY, "dist": {"activation_checkpointing": True}}, timeout_s=400)
    assert (tmp_path / "bench_zero.json").exists()
    st = rep["stages"]
    single = rep["single"]["losses"]
    assert len(single) == 4 and all(math.isfinite(x) for x in single)
    for s in ("0", "1", "2", "3"):
        losses = st[s]["losses_mean_over_ranks"]
        # same global batches and seed: every stage follows the single-process trajectory
        assert losses == pytest.approx(single, rel=2e-5), s
        assert st[s]["resume_exact"] is True, s  # save → 2 steps vs reload into a fresh engine → same 2 steps
        assert st[s]["images_per_s"] > 0
    total = st["3"]["param_elements_total"]
    for held in st["3"]["param_elements_held"]:  # ZeRO-3 really partitions: each rank holds ~1/2
        assert abs(held / total - 0.5) < 0.01
    assert sum(st["3"]["param_elements_held"]) >= total
    assert st["0"]["param_elements_held"] == [total, total]
    ratio = rep["state_ratio_vs_zero0"]
    assert ratio["1"]["optimizer_state"] == pytest.approx(0.5, abs=0.01)
    assert ratio["2"]["grads"] == pytest.approx(0.5, abs=0.01)
    assert ratio["3"]["params"] == pytest.approx(0.5, abs=0.01)
    assert ratio["3"]["sharded_states"] == pytest.approx(0.5, abs=0.01)


# --- slow: real Ray Train fits ------------------------------------------------------------------------------------
def _cluster_processes(root: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(root in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _assert_cluster_gone(root: str, wait_s: float = 20.0) -> None:
    """No process of the Ray cluster rooted at ``root`` may outlive the test; leftovers are killed, then fail."""
    deadline = time.monotonic() + wait_s
    left = _cluster_processes(root)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in _cluster_processes(root) if p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, f"Ray processes left running: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def ray_root() -> Iterator[str]:
    """A short private RAY_TMPDIR (Unix socket paths must stay < 108 chars) that identifies our clusters."""
    root = tempfile.mkdtemp(prefix="etr", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    yield root
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    _assert_cluster_gone(root)
    shutil.rmtree(root, ignore_errors=True)


def _single_process_history(cfg: RunConfig) -> list[dict[str, float]]:
    """The same global batches in one process (PlainBackend), i.e. what a 2-worker ZeRO-0 run must reproduce."""
    from etbench.bench.zero import MergedShardsTask
    from etbench.engine.backend import PlainBackend
    from etbench.engine.build import build_model, seed_everything
    from etbench.engine.loop import train_loop

    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each Ray worker; two OpenMP threads crawl on a busy 2-core machine
    try:
        seed_everything(cfg.train.seed)
        task = MergedShardsTask(cfg, cfg.dist.workers, device)
        backend = PlainBackend(build_model(cfg, task.describe()), cfg.train, task.num_train_batches(), device)
        return train_loop(task, backend, cfg.train.epochs, progress=False).history
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage0_run(ray_root: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One 2-worker ZeRO-0 TorchTrainer fit; ``fit`` starts its own local Ray and must shut it down."""
    import ray

    from etbench.engine.launch import fit

    out = tmp_path_factory.mktemp("stage0") / "run"
    summary = fit(tiny_cfg(zero_stage=0), out, progress=False)
    assert not ray.is_initialized()
    _assert_cluster_gone(ray_root)
    return out, summary


KEYS = ("train/loss", "val/mse_masked", "test/mse_masked", "lr")


@pytest.mark.slow
def test_stage0_fit_matches_the_single_process_run(stage0_run: tuple[Path, dict]) -> None:
    out, summary = stage0_run
    history = json.loads((out / "metrics.json").read_text())
    reference = _single_process_history(tiny_cfg(zero_stage=0))
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    for got, want in zip(history, reference, strict=True):
        for k in KEYS:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9), k
    assert summary["distributed"]["workers"] == 2 and summary["distributed"]["resumed_from_epoch"] is None
    assert json.loads((out / "summary.json").read_text())["config_hash"] == summary["config_hash"]
    for name in ("config.json", "metrics.csv", "energy_trace.csv", "reconstruction.png", "memories.png"):
        assert (out / name).is_file(), name
    assert list((out / "ray").glob("etbench-*/checkpoint_*/ds"))  # DeepSpeed checkpoints inside Ray's
    # retention (default: the latest and the best, issue 28.5): of the 3 epochs' checkpoints Ray deleted the others
    best = min(range(3), key=lambda i: (history[i]["val/mse_masked"], i))
    assert len([d for d in (out / "ray").glob("etbench-*/checkpoint_*") if d.is_dir()]) == (1 if best == 2 else 2)
    from etbench.engine.launch import fit
    from etbench.engine.run import RunExistsError

    with pytest.raises(RunExistsError, match="--resume"):  # refused before Ray starts
        fit(tiny_cfg(zero_stage=0), out, progress=False)


@pytest.fixture
def running_ray(ray_root: str) -> Iterator[None]:
    """A Ray that the caller (like a Ray Tune trial) already runs: fit must use it and leave it running."""
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.2", num_cpus=2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        yield
    finally:
        ray.shutdown()
        _assert_cluster_gone(ray_root)


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_reproduces_the_run(
    stage0_run: tuple[Path, dict], running_ray: None, tmp_path: Path
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from etbench.engine.launch import fit
    from etbench.engine.tracked import TrackingSpec
    from etbench.engine.worker import FaultInjection

    marker = tmp_path / "killed.txt"
    cfg = tiny_cfg(zero_stage=0, max_failures=1)
    spec = TrackingSpec(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="dist", grid="test", run_name="fault",
                        artifact_root=str(tmp_path / "artifacts"))
    summary = fit(cfg, tmp_path / "run", tracking=spec, progress=False,
                  fault=FaultInjection(epoch=1, rank=1, marker=str(marker)))
    assert ray.is_initialized()  # not ours to shut down
    assert marker.read_text().startswith("killed rank 1 in epoch 1")
    assert summary["distributed"]["resumed_from_epoch"] == 1  # restarted from the epoch-1 checkpoint
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    uninterrupted = json.loads((stage0_run[0] / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    for got, want in zip(history, uninterrupted, strict=True):  # the re-run epoch and the next one: bit-identical
        for k in KEYS:
            assert got[k] == want[k], (got["epoch"], k)
    # rank 0 logged to the run the driver created: each epoch once, then summary + artifacts, FINISHED
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    client = MlflowClient(spec.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    logged = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in logged] == [1, 2, 3]
    assert [m.value for m in logged] == pytest.approx([r["train/loss"] for r in history], rel=1e-12)
    assert "summary.json" in {a.path for a in client.list_artifacts(run_id)}


# --- slow: a graph run under Ray Train + DeepSpeed ----------------------------------------------------------------
GRAPH_TINY = {"task": {"kind": "graph", "dataset": "synthetic", "train_ratio": 0.4},
              "train": {"epochs": 3, "lr": 0.01, "warmup_epochs": 0, "weight_decay": 0.0}}
GRAPH_KEYS = ("val/loss", "val/auroc", "test/auroc", "val/macro_f1")


def test_graph_shard_losses_average_to_the_full_batch_loss() -> None:
    """Each rank's scaled shard loss, averaged over ranks, is the single-process class-weighted mean exactly."""
    from etbench.engine.build import build_model, build_task

    cfg = resolve_run_config({**GRAPH_TINY, "dist": {"workers": 3}})
    full = build_task(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, full.describe())
    want = full.train_loss(model, None)
    shards = [build_task(cfg, torch.device("cpu"), rank=r, world=3) for r in range(3)]
    assert sum(int(t.train_shard.numel()) for t in shards) == int(full.train_shard.numel())
    got = sum(t.train_loss(model, None) for t in shards) / 3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_graph_fit_on_two_deepspeed_workers_matches_one_process(ray_root: str, tmp_path: Path) -> None:
    """The graph task through TorchTrainer + DeepSpeed (ZeRO-2, 2 ranks): same evaluation history as one process."""
    import ray

    from etbench.engine.launch import fit
    from etbench.engine.run import run_single

    cfg = resolve_run_config({**GRAPH_TINY, "dist": {"workers": 2, "zero_stage": 2}})
    summary = fit(cfg, tmp_path / "dist", progress=False)
    assert not ray.is_initialized()
    _assert_cluster_gone(ray_root)
    assert summary["distributed"]["workers"] == 2 and summary["distributed"]["zero_stage"] == 2
    assert summary["data"]["synthetic"] is True
    history = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_single(resolve_run_config(GRAPH_TINY), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0] and single.summary["best_epoch"] >= 1
    for got, want in zip(history, reference, strict=True):
        for k in GRAPH_KEYS:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    assert (tmp_path / "dist" / "energy_trace.csv").is_file()
