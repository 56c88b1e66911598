"""The single-run engine on the image task: learning, exact resume, files, errors, tracking, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from etbench.cli import main
from etbench.config import ConfigError, resolve_run_config
from etbench.engine.backend import DivergedError
from etbench.engine.run import RunExistsError, run_single
from etbench.engine.tracked import TrackingSpec, run_tracked
from etbench.models.registry import IMAGE_PRESETS, ImageModelSpec, build_image_model, names
from etbench.tasks.image_task import ImageTask

TINY = {
    "task": {"dataset": "digits", "limit_train": 192, "limit_eval": 64},
    "model": {"et": {"steps": 3}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5, "eval_trace_samples": 4},
}


def tiny(**over) -> object:
    from etbench.config import deep_merge

    return resolve_run_config(deep_merge(TINY, over))


def test_tiny_run_learns_and_writes_every_file(tmp_path: Path) -> None:
    cfg = tiny(train={"epochs": 5})
    res = run_single(cfg, tmp_path / "run", progress=False)
    losses = [row["train/loss"] for row in res.state.history]
    assert len(losses) == 5
    assert losses[-1] < 0.75 * losses[0], losses
    for name in ("config.json", "metrics.json", "metrics.csv", "summary.json", "energy_trace.csv",
                 "reconstruction.png", "memories.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config_hash"] == cfg.hash() and summary["paper_comparable"] is False
    assert summary["cost"]["params"] > 0 and summary["cost"]["flops_per_sample"] > 0
    assert summary["energy"]["rise_fraction"] == 0.0
    assert 0 < summary["best"]["val/mse_masked"] < 2
    rows = (tmp_path / "run" / "energy_trace.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "sample", "E", "E_att", "E_hn", "dx_norm", "rose", "grad_norm_mean",
                                  "grad_norm_max", "rel_update", "fixed_point_step"]
    assert len(rows) == 1 + 4 * (3 + 1)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path: Path) -> None:
    cfg = tiny()
    full = run_single(cfg, tmp_path / "full", progress=False)
    part = run_single(cfg, tmp_path / "part", progress=False, stop_after_epochs=2)
    assert part.state.epoch == 2 and not (tmp_path / "part" / "summary.json").exists()
    resumed = run_single(cfg, tmp_path / "part", progress=False, resume=True)
    assert [r["train/loss"] for r in resumed.state.history] == [r["train/loss"] for r in full.state.history]
    assert resumed.state.history[-1]["val/mse_masked"] == full.state.history[-1]["val/mse_masked"]


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    cfg = tiny(train={"epochs": 1})
    run_single(cfg, tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.json").read_text()
    with pytest.raises(RunExistsError, match="--resume"):
        run_single(cfg, tmp_path / "r", progress=False)
    with pytest.raises(RunExistsError, match="holds config"):
        run_single(tiny(train={"epochs": 2}), tmp_path / "r", progress=False, resume=True)
    assert (tmp_path / "r" / "metrics.json").read_text() == before


def test_nan_loss_stops_with_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ImageTask.train_loss

    def poisoned(self, model, batch):  # type: ignore[no-untyped-def]
        return real(self, model, batch) * torch.tensor(float("nan"))

    monkeypatch.setattr(ImageTask, "train_loss", poisoned)
    with pytest.raises(DivergedError, match="non-finite training loss"):
        run_single(tiny(), tmp_path / "nan", progress=False)


@pytest.mark.parametrize("name", names("image"))
def test_every_registered_model_runs_forward_backward(name: str) -> None:
    p = IMAGE_PRESETS["digits"]
    model = build_image_model(ImageModelSpec(name=name, image_shape=p.image_shape, patch=p.patch,
                                             et=p.et.model_copy(update={"steps": 2})))
    images = torch.randn(3, *p.image_shape)
    replace = torch.rand(3, model.num_patches) < 0.5
    out = model(images, replace)
    assert out.shape == (3, model.num_patches, model.patch_dim)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.num_parameters() > 0 and model.flops_per_image() > 0


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        resolve_run_config({"task": {"dataset": "digits"}, "train": {"lr": -1}})
    with pytest.raises(ConfigError, match="gcn"):
        resolve_run_config({"task": {"dataset": "digits"}, "model": {"name": "gcn"}})
    with pytest.raises(ConfigError, match=r"model\.et\.hn_kind"):
        resolve_run_config({"model": {"et": {"hn_kind": "tanh"}}})


def test_config_hash_is_stable_and_sensitive() -> None:
    a, b = tiny(), tiny()
    assert a.hash() == b.hash() and len(a.hash()) == 12
    assert tiny(model={"et": {"steps": 4}}).hash() != a.hash()


def test_tracked_run_lands_in_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(train={"epochs": 2})
    spec = TrackingSpec(uri=uri, experiment="t", grid="t", run_name="ok", axes={"model.et.steps": 3},
                        artifact_root=str(tmp_path / "art"))
    summary = run_tracked(cfg, tmp_path / "ok", spec, progress=False)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["etbench.config_hash"] == cfg.hash()
    assert run.data.tags["etbench.axis.model.steps"] == "3"
    assert run.data.params["model.et.steps"] == "3"
    assert run.data.metrics["best/val/mse_masked"] == pytest.approx(summary["best"]["val/mse_masked"])
    assert len(client.get_metric_history(run.info.run_id, "val/mse_masked")) == 2
    assert len(client.get_metric_history(run.info.run_id, "energy/E")) == 4
    arts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"energy_trace.csv", "reconstruction.png", "memories.png", "summary.json"} <= arts


def test_cli_train_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "image", "--dataset", "digits", "--model", "vit-tied", "--steps", "2", "--epochs", "1",
               "--set", "task.limit_train=64", "--set", "task.limit_eval=32", "--out", str(tmp_path / "cli")])
    assert rc == 0
    assert "results in" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["config"]["model"]["name"] == "vit-tied"
    assert main(["train", "image", "--dataset", "digits", "--set", "train.lr=-1", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
