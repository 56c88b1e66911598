"""Energy rises: judged against the rounding error of E (not a fixed fraction of |E|), and carried end to end
from a large-α run into energy_trace.csv, summary.json, MLflow and the report's energy figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from etbench.analysis.report import make_report
from etbench.config import resolve_run_config
from etbench.engine.tracked import TrackingSpec, run_tracked
from etbench.models.energy import EnergyTrace, EnergyTransformer
from etbench.models.et_config import ETConfig
from etbench.tasks.image_task import ImageTask


def _trace(e: list[float], eps: float) -> EnergyTrace:
    t = torch.tensor([e], dtype=torch.float64)
    return EnergyTrace(t, t / 2, t / 2, torch.ones(1, len(e) - 1), eps)


def test_rise_hidden_by_a_large_constant_is_still_flagged() -> None:
    """|E| ≈ 1e4 (constants); the steps change E by ~0.1 and the last step rises by 1e-6 — ten thousand times the
    float64 rounding error of E, but far below the old tolerance 1e-6·|E| = 1e-2."""
    base = 1e4
    tr = _trace([base + 1.0, base + 0.9, base + 0.9 + 1e-6], torch.finfo(torch.float64).eps)
    assert tr.rose().tolist() == [[False, True]]
    assert tr.rise_fraction() == 0.5
    old = tr.E[..., 1:] > tr.E[..., :-1] + 1e-6 * tr.E[..., :-1].abs() + 1e-9
    assert not old.any()  # what the previous rule reported
    # the same numbers computed in float32 would carry rounding errors of ~1e-3: a 1e-6 "rise" is noise there
    assert not _trace([base + 1.0, base + 0.9, base + 0.9 + 1e-6], torch.finfo(torch.float32).eps).rose().any()
    assert _trace([base + 1.0, base + 0.9, base + 0.95], torch.finfo(torch.float32).eps).rose().tolist() == [
        [False, True]]


def test_descend_records_its_dtype_and_float64_descents_never_rise_at_small_alpha() -> None:
    torch.manual_seed(0)
    et = EnergyTransformer(ETConfig(dim=16, heads=2, head_dim=8)).double()
    _, tr = et.descend(torch.randn(3, 6, 16, dtype=torch.float64), steps=8, alpha=0.05)
    assert tr is not None and tr.eps == torch.finfo(torch.float64).eps
    assert not tr.rose().any(), tr.E
    _, tr32 = EnergyTransformer(ETConfig(dim=16, heads=2, head_dim=8)).descend(torch.randn(3, 6, 16), steps=4)
    assert tr32 is not None and tr32.eps == torch.finfo(torch.float32).eps


def test_rises_reach_trace_summary_and_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring from the trained model's trace to every place a reader looks. The image ET's LayerNorm keeps
    its descent descending even at α = 1e4, so the real trace gets rises added at known (sample, step) pairs
    (how large α makes the raw ET rise is tested in test_energy)."""
    real = ImageTask.energy_trace
    planted: dict[str, float] = {}

    def with_rises(self: ImageTask, model: torch.nn.Module, n: int) -> EnergyTrace | None:
        tr = real(self, model, n)
        assert tr is not None
        e = tr.E.clone()
        e[::2, 2:] += 10.0 * (tr.E[::2, 1:2] - tr.E[::2, 2:3]).abs() + 1.0  # samples 0, 2, …: update 1 rises
        planted["fraction"] = float((e[..., 1:] > e[..., :-1]).double().mean())
        return EnergyTrace(e, tr.E_att, tr.E_hn + (e - tr.E), tr.dx_norm, tr.eps)

    monkeypatch.setattr(ImageTask, "energy_trace", with_rises)
    cfg = resolve_run_config({
        "task": {"dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "model": {"et": {"steps": 4}},
        "train": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "eval_trace_samples": 8},
    })
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = TrackingSpec(uri=uri, experiment="rise", grid="rise", run_name="rises",
                        artifact_root=str(tmp_path / "art"))
    summary = run_tracked(cfg, tmp_path / "run", spec, progress=False)
    want = planted["fraction"]
    assert want == pytest.approx(0.5 / 4)  # half the samples, one of four updates
    with (tmp_path / "run" / "energy_trace.csv").open() as f:
        rows = list(csv.DictReader(f))
    flagged = [(int(r["sample"]), int(r["step"])) for r in rows if r["rose"] == "True"]
    assert flagged == [(b, 1) for b in range(0, 8, 2)]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["energy"]["rise_fraction"] == summary["energy"]["rise_fraction"] == pytest.approx(want)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rise").experiment_id])
    assert run.data.metrics["energy/rise_fraction"] == pytest.approx(want)
    # … and the report's energy figure marks them: ▼ at the end of update 1 (step 2) on the E panel, titled
    report = make_report("rise", uri, tmp_path / "report", progress=lambda _: None)
    (title,) = [t for name, t in report.titles.items() if name.startswith("energy_")]
    assert "E rose on 1 update(s) (▼ where it ended higher; up to 50% of samples)" in title and "Student t" in title
    (rises_csv,) = (tmp_path / "report").rglob("energy_rises_*.csv")
    rises = pd.read_csv(rises_csv)
    assert rises[["update", "step", "share", "n"]].values.tolist() == [[1, 2, 0.5, 8]]
    assert title in (tmp_path / "report" / "README.md").read_text()
