"""``etbench dynamics`` (issue 24.2): a finished run re-evaluated at test-time steps T' and step sizes α' = scale·α.

Oracles: the run's own recorded test metrics (T' = training T), a hand-written no-descent model (T' = 0), the
energy theory (no rise at small α, rises at large α on an attention energy that overshoots), and autograd for
‖∂E/∂g‖. Tiny runs trained in-process once per module (digits, a few dozen images; the synthetic graph).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from etbench.cli import main
from etbench.config import deep_merge, resolve_run_config
from etbench.engine import dynamics as dyn
from etbench.engine.run import run_single
from etbench.engine.tracked import TrackingSpec, run_tracked
from etbench.tracking.schema import DYNAMICS_COLUMNS

IMAGE = {"task": {"dataset": "digits", "limit_train": 48, "limit_eval": 24},
         "model": {"et": {"steps": 3}},
         "train": {"epochs": 1, "batch_size": 24, "warmup_epochs": 0, "eval_trace_samples": 2, "device": "cpu"}}


def _image(**over: Any) -> Any:
    return resolve_run_config(deep_merge(IMAGE, over))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Finished runs: the image ET (tracked in MLflow, in a grid's trial layout), vit-tied, the graph ET, and an
    attention-only ET whose energy overshoots at large steps."""
    root = tmp_path_factory.mktemp("dyn")
    results = root / "results"
    uri = f"sqlite:///{results / 'mlflow.db'}"
    et = _image()
    results.mkdir()
    run_tracked(et, results / "g" / "trials" / et.hash(), progress=False,
                spec=TrackingSpec(uri=uri, experiment="g", grid="g", run_name="et", artifact_root=str(root / "art")))
    tied = _image(model={"name": "vit-tied", "et": {"steps": 2}})
    run_single(tied, root / "tied", progress=False)
    graph = resolve_run_config({"task": {"kind": "graph", "dataset": "synthetic", "protocol": "bwgnn",
                                         "train_ratio": 0.4},
                                "train": {"epochs": 2, "lr": 0.01, "warmup_epochs": 0, "device": "cpu"}})
    run_single(graph, root / "graph", progress=False)
    # 2 tokens (CLS + one 8×8 patch), attention only, W^K, W^Q ~ N(0, 0.3²): large steps overshoot (measured)
    rise = _image(task={"patch": 8}, model={"et": {"dim": 8, "heads": 1, "head_dim": 8, "memories": 8, "terms": "attn",
                                                   "attn_init_std": 0.3, "alpha": 0.001, "steps": 8}},
                  train={"lr": 1e-5})
    run_single(rise, root / "rise", progress=False)
    return {"root": root, "uri": uri, "et": results / "g" / "trials" / et.hash(), "tied": root / "tied",
            "graph": root / "graph", "rise": root / "rise"}


@pytest.mark.parametrize("which", ["et", "tied", "graph"])
def test_training_steps_reproduce_the_recorded_test_metrics(runs: dict[str, Any], which: str) -> None:
    run = dyn.load_run(runs[which])
    (row,) = dyn.probe(run, [run.cfg.model.et.steps], [1.0])
    metrics = {k: v for k, v in row.items() if k.startswith("test/")}
    assert metrics and metrics == {k: run.recorded[k] for k in metrics}  # exactly: same weights, data, masks


class _NoDescent(nn.Module):
    """The image model with its T steps removed, written out: decode(norm(tokens)) without CLS."""

    def __init__(self, model: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.model, self.norm = model, norm

    def forward(self, images: Tensor, replace: Tensor) -> Tensor:
        return self.model.decoder(self.norm(self.model.tokens(images, replace))[:, 1:])


@pytest.mark.parametrize("which", ["et", "tied"])
def test_zero_steps_is_the_no_descent_output(runs: dict[str, Any], which: str) -> None:
    run = dyn.load_run(runs[which])
    (row,) = dyn.probe(run, [0], [1.0])
    norm = run.model.et.norm if which == "et" else run.model.norm
    want = dyn.split_metrics(run.task, _NoDescent(run.model, norm))
    assert {k: row[k] for k in want} == want
    assert row["fixed_point_step"] == "" and row["delta_norm"] != row["delta_norm"]  # no update: NaN
    if which == "et":
        assert row["energy"] == row["energy"] and row["grad_norm"] > 0


def test_rows_for_every_pair_and_the_csv(runs: dict[str, Any], tmp_path: Path) -> None:
    run = dyn.load_run(runs["et"])
    rows = dyn.probe(run, [0, 1, 4], [0.5, 1, 2])
    assert [(r["eval_steps"], r["alpha_scale"]) for r in rows] == [(t, s) for t in (0, 1, 4) for s in (0.5, 1, 2)]
    path = dyn.write_csv(rows, tmp_path)
    with path.open() as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header[:2] == ["eval_steps", "alpha_scale"] and header[-5:] == list(DYNAMICS_COLUMNS)
    assert {"test/mse_masked", "test/psnr"} <= set(header)
    assert len(table) == 9 and table[0]["delta_norm"] == "" and float(table[-1]["delta_norm"]) > 0
    assert all(r["rose_fraction"] == 0.0 for r in rows if r["eval_steps"])


def test_energy_never_rises_at_small_alpha_and_does_at_large(runs: dict[str, Any]) -> None:
    run = dyn.load_run(runs["rise"])
    small, large = dyn.probe(run, [8], [1.0, 1e4])
    assert small["rose_fraction"] == 0.0
    assert large["rose_fraction"] > 0.0


def test_grad_norm_is_the_autograd_norm_of_dE_dg(runs: dict[str, Any]) -> None:
    run = dyn.load_run(runs["et"])
    (row,) = dyn.probe(run, [2], [2.0])
    core, task = run.model, run.task
    images, mask = task.eval_batch(len(task.splits.test), "test")
    with torch.no_grad():
        x, _ = core.et.descend(core.tokens(images, mask.replaced), steps=2, alpha=2.0 * core.et.cfg.alpha,
                               trace=False)
    g = core.et.norm(x).double().requires_grad_(True)
    et64 = core.et.double()
    (grad,) = torch.autograd.grad(et64.energy(g).E.sum(), g)
    want = grad.norm(dim=-1).mean(-1).mean()  # per token, mean over tokens, mean over test images
    assert row["grad_norm"] == pytest.approx(float(want), rel=1e-4)


def test_vit_tied_takes_only_scale_one_and_other_models_are_refused(runs: dict[str, Any], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = dyn.load_run(runs["tied"])
    with pytest.raises(dyn.DynamicsError, match="only --alpha-scale 1"):
        dyn.probe(run, [1], [1.0, 2.0])
    (row,) = dyn.probe(run, [4], [1.0])
    assert row["energy"] != row["energy"] and row["delta_norm"] > 0  # no energy (NaN); the block still moves x
    vit = tmp_path / "vit"
    vit.mkdir()
    cfg = json.loads((runs["tied"] / "config.json").read_text())
    cfg["config"]["model"]["name"] = "vit"
    (vit / "config.json").write_text(json.dumps(cfg))
    (vit / "metrics.json").write_text("[]")
    assert main(["dynamics", str(vit), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'vit'" in err[0] and "vit-tied" in err[0]


def test_cli_by_mlflow_run_id_logs_the_csv(runs: dict[str, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    client = MlflowClient(runs["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("g").experiment_id])
    out = tmp_path / "out"
    assert main(["dynamics", "--run-id", run.info.run_id, "--tracking-uri", runs["uri"], "--steps", "0", "3",
                 "--alpha-scale", "1", "2", "--out", str(out)]) == 0
    assert "4 rows" in capsys.readouterr().out
    assert (out / "dynamics.csv").is_file() and (out / "dynamics.png").is_file()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "dynamics")}
    assert {"dynamics/dynamics.csv", "dynamics/dynamics.png"} <= logged


def test_trace_diagnostics_reach_mlflow_and_the_report(runs: dict[str, Any], tmp_path: Path) -> None:
    from etbench.analysis.report import make_report

    client = MlflowClient(runs["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("g").experiment_id])
    steps = 3  # the image ET's T
    assert len(client.get_metric_history(run.info.run_id, "energy/grad_norm_mean")) == steps + 1
    assert len(client.get_metric_history(run.info.run_id, "energy/grad_norm_max")) == steps + 1
    assert len(client.get_metric_history(run.info.run_id, "energy/rel_update")) == steps
    report = make_report("g", runs["uri"], tmp_path / "report", progress=lambda _: None)
    assert [n for n in report.titles if n.startswith("descent_diagnostics_")]
    assert list((tmp_path / "report").rglob("descent_diagnostics_*.csv"))
