"""`etbench bench core` end to end on a tiny config: every mode timed, ratios, levers, profile and JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etbench.bench.core import run_core
from etbench.bench.core_profile import categorize
from etbench.peers import xla_et

TINY = {"dim": 16, "heads": 2, "head_dim": 8, "memories": 32, "tokens": 5, "batch": 2, "steps": 2, "repeats": 2}


def test_run_core_writes_ratios_levers_and_profile(tmp_path: Path) -> None:
    peer = "xla" if xla_et.available() else None
    rep = run_core(tmp_path, "cpu", peer, measure_memory=False, **TINY)
    on_disk = json.loads((tmp_path / "bench_core.json").read_text())
    assert on_disk["ratios"] == pytest.approx(rep["ratios"])
    assert {"analytic", "autograd"} <= set(rep["results"])
    assert any(k.startswith("analytic[gemm=") for k in rep["results"])
    assert all(len(r["times_s"]) == TINY["repeats"] and r["median_s"] > 0 for r in rep["results"].values())
    assert rep["load_average"]["before"] is not None
    prof = rep["decomposition"]["profile"]["analytic"]
    assert prof["gemm_gflops"] * 1e9 == pytest.approx(rep["results"]["analytic"]["train_step_flops"], rel=1e-6)
    assert 0.99 < sum(c["share"] for c in prof["categories"].values()) < 1.01
    assert any(k.startswith("gemm=") for k in rep["levers"]) and rep["levers"]["defaults"]["gemm"] in ("onednn", "aten")
    if peer:
        assert rep["results"]["xla"]["median_s"] > 0
        assert rep["ratios"]["speed_analytic_over_xla"] == pytest.approx(
            rep["results"]["xla"]["median_s"] / rep["results"]["analytic"]["median_s"])
        assert "default>=1.0x_xla" in rep["targets"]


def test_run_core_rejects_unknown_peer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="peer must be one of"):
        run_core(tmp_path, "cpu", "tvm", **TINY)
    assert not (tmp_path / "bench_core.json").exists()


def test_profile_categories() -> None:
    assert categorize("aten::mm") == categorize("mkldnn::_linear_pointwise") == "gemm"
    assert categorize("aten::_softmax") == "softmax"
    assert categorize("aten::copy_") == "copies"
    assert categorize("aten::threshold_backward") == "elementwise"
    assert categorize("aten::some_new_op") == "other"


def test_run_core_compile_lever(tmp_path: Path) -> None:
    import torch._dynamo as dynamo

    dynamo.reset()
    try:
        rep = run_core(tmp_path, "cpu", None, measure_memory=False, profile=False, compile=True, **TINY)
    finally:
        dynamo.reset()
    lever = rep["levers"]["compile"]
    assert rep["results"]["analytic[compile]"]["median_s"] > 0
    assert lever["graph_breaks"] == 0 and lever["recompiles"] == 0 and lever["loss_rel_diff"] < 1e-5
    assert lever["speedup_over_eager"] == pytest.approx(
        rep["results"]["analytic"]["median_s"] / rep["results"]["analytic[compile]"]["median_s"])
    assert lever["autograd_mode_trace"]["graph_breaks"] > 0
    assert json.loads((tmp_path / "bench_core.json").read_text())["levers"]["compile"]["compile_s"] > 0
