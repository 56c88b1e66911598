"""The GPU check's entry point, run here on CPU with the bare GPU image's import set, so a missing import or a broken
section shows up before a GPU is lent (``bash cluster/gpu_check.sh --device cpu --tiny``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from etbench.bench import gpu_check
from etbench.bench.gpu_train import MODELS, StepSettings, run_image_section
from etbench.cluster import gpu_bundle
from etbench.models.baselines.vit import build_vit
from etbench.models.image import ImageET
from etbench.models.registry import IMAGE_PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_with_the_image_import_set(tmp_path: Path) -> None:
    site, log = gpu_bundle.write_blocker(tmp_path / "image")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site.parent), "OUT": str(out),
           "GPU_BUNDLE": str(REPO / ".whl")}  # installed into a temp dir when `make gpu-bundle` has run here
    env.pop("DS_ACCELERATOR", None)  # the script unsets it; the check sets cpu for its sections itself
    proc = subprocess.run(["bash", "cluster/gpu_check.sh", "--device", "cpu", "--tiny", "--steps", "3", "--warmup",
                           "1", "--batch", "4", "--peak-tflops", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert gpu_bundle.unexpected_imports(log.read_text().splitlines()) == []  # only image + bundle were needed

    env_info = report["environment"]
    assert env_info["device"] == "cpu" and env_info["versions"]["deepspeed"] and env_info["versions"]["pydantic"]
    image = report["sections"]["image"]
    assert image["errors"] == [] and image["dataset_preset"] == "digits" and image["et"]["steps"] == 2
    assert [(r["model"], r["grad_mode"]) for r in image["results"]] == list(MODELS)
    for r in image["results"]:
        assert r["engine"] == "deepspeed" and r["steps_timed"] == 3 and r["loss_finite"]
        assert r["images_per_s"] == pytest.approx(4 / (r["step_ms"] / 1000))
        assert r["mfu"] == pytest.approx(3 * r["forward_gflops_per_image"] * 1e9 * r["images_per_s_per_gpu"] / 1e12)
        assert r["peak_mem_gib"] is None and r["mfu_vs_measured_matmul"] is None  # GPU figures; none on CPU
    by = {(r["model"], r["grad_mode"]): r for r in image["results"]}
    assert image["ratios"]["et_over_vit_forward_flops"] == pytest.approx(
        by["et", "analytic"]["forward_gflops_per_image"] / by["vit", None]["forward_gflops_per_image"])
    assert by["et", "analytic"]["forward_gflops_per_image"] == by["et", "autograd"]["forward_gflops_per_image"]

    core = report["sections"]["core"]
    assert "error" not in core, core
    results = core["report"]["results"]
    assert core["call"]["peer"] == "xla" and {"analytic", "autograd", "xla"} <= set(results)
    assert all(results[m]["median_s"] > 0 for m in ("analytic", "autograd", "xla"))
    assert report["wall_s"] < gpu_check.parse([]).budget_s


def test_script_refuses_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_BUNDLE": "/nonexistent"}
    proc = subprocess.run(["bash", "cluster/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device is visible" in proc.stderr and "--device cpu --tiny" in proc.stderr


def test_bad_arguments_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse(["--tiny"])
    assert "--tiny is the CPU smoke mode: pass --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse(["--batch", "0"])
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_default_output_follows_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse([]).out == str(tmp_path / "gpu_check.json")
    monkeypatch.delenv("OUT")
    assert gpu_check.parse([]).out == "results/gpu_check.json"


def test_the_vit_beside_the_paper_scale_et_is_flop_matched() -> None:
    """ViT-B/16 (depth T = 12, the ET's width and heads, MLP ratio 4) does the ET's forward FLOPs within 5 %."""
    preset = IMAGE_PRESETS["imagenet"]
    with torch.device("meta"):
        et = ImageET(preset.image_shape, preset.patch, preset.et)
        vit = build_vit(preset.image_shape, preset.patch, preset.et)
    assert (et.num_tokens, et.dim, preset.et.heads, preset.et.head_dim, preset.et.num_memories, preset.et.steps) \
        == (197, 768, 12, 64, 3072, 12)
    assert 0.95 < et.flops_per_image() / vit.flops_per_image() < 1.05


def test_a_deepspeed_failure_falls_back_to_the_torch_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first DeepSpeed failure is recorded; that model and the later ones still get figures (plain torch)."""
    import etbench.engine.ds_backend as ds

    def broken(*args: object, **kwargs: object) -> None:
        raise ImportError("No module named 'deepspeed' (simulated)")

    monkeypatch.setattr(ds, "DeepSpeedBackend", broken)
    s = StepSettings(steps=2, warmup=1, batch=2, tiny=True, peak_tflops=None)
    out = run_image_section(s, 1, torch.device("cpu"))
    assert [(r["model"], r["grad_mode"], r["engine"]) for r in out["results"]] == [(m, g, "torch") for m, g in MODELS]
    assert [(e["model"], e["engine"]) for e in out["errors"]] == [("et", "deepspeed")]
    assert "simulated" in out["errors"][0]["error"]
    assert all(r["steps_timed"] == 2 and r["mfu"] is None and r["loss_finite"] for r in out["results"])


def test_stopping_the_check_stops_its_running_section(tmp_path: Path) -> None:
    """Sections run in their own sessions; a stopped check (``timeout``, a lease ending) must take them along."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.Popen([sys.executable, "-m", "etbench.bench.gpu_check", "--device", "cpu", "--tiny",
                             "--sections", "image", "--out", str(out)], cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        parent, kids, deadline = psutil.Process(proc.pid), [], time.monotonic() + 120
        while not kids and time.monotonic() < deadline and proc.poll() is None:
            kids = parent.children(recursive=True)
            time.sleep(0.2)
        assert kids, "the image section never started"
        proc.terminate()
        assert proc.wait(timeout=60) == 143
        _, alive = psutil.wait_procs(kids, timeout=30)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
    report = json.loads(out.read_text())  # the partial report written before the first section
    assert report["benchmark"] == "gpu_check" and report["sections"] == {}
