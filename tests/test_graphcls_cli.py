"""``etbench train graphcls`` (one fold of a TU set through ``graphcls_run.train_fold``: metrics with ``test/acc``,
--resume, one clean error line for bad dataset / model / protocol / fold values) and ``etbench sweep plan`` of a
graphcls grid (a finite cost estimate, one trial per model × fold)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import require_file

from etbench.cli import main
from etbench.data.tudataset import TU_DATASETS
from etbench.engine import graphcls_run
from etbench.sweep.grid import estimate_cost, expand, load_grid


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ETBENCH_DEBUG", raising=False)
    return tmp_path


def test_one_mutag_fold_trains_writes_test_acc_and_resumes(cli_env: Path, shared_data: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    require_file(shared_data / TU_DATASETS["mutag"].relpath)
    monkeypatch.setenv("ETBENCH_DATA", str(shared_data))
    out = cli_env / "fold"
    args = ["train", "graphcls", "--dataset", "mutag", "--model", "gin", "--protocol", "cv10", "--fold", "1",
            "--epochs", "2", "--seed", "3", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "best epoch" in printed and "test/acc" in printed
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(0.0 <= r["test/acc"] <= 1.0 for r in rows)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["task"] | {"kind": "graphcls", "dataset": "mutag", "protocol": "cv10", "fold": 1, "repeat": 0} \
        == config["task"]
    assert (config["model"]["name"], config["train"]["epochs"], config["train"]["seed"]) == ("gin", 2, 3)
    best = json.loads((out / "summary.json").read_text())["best"]
    assert "test/acc" in best

    assert main(args) == 2  # the folder holds a run: refused without --resume, in one line
    (line,) = _error_lines(capsys.readouterr().err)
    assert "--resume" in line and str(out) in line
    assert main([*args, "--resume"]) == 0  # already at its last epoch: only the summary is written again
    assert "resumed" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text()) == rows


@pytest.mark.parametrize("model, protocol, dataset, repeat", [("et", "authors", "mutag", 2), ("mlp", "cv10", "nci1", 0),
                                                              ("gin", "stored", "dd", 0)])
def test_every_model_and_protocol_reaches_train_fold(model: str, protocol: str, dataset: str, repeat: int,
                                                     cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(graphcls_run, "train_fold", lambda cfg, out, **kw: seen.append((cfg, out, kw)) or
                        graphcls_run.RunResult(out, cfg.hash(), None, {"best_epoch": 1, "best": {}}, None))
    assert main(["train", "graphcls", "--dataset", dataset, "--model", model, "--protocol", protocol, "--fold", "9",
                 "--repeat", str(repeat), "--out", "o"]) == 0
    ((cfg, out, kw),) = seen
    assert (cfg.task.kind, cfg.task.dataset, cfg.task.protocol, cfg.task.fold, cfg.task.repeat, cfg.model.name) == (
        "graphcls", dataset, protocol, 9, repeat, model)
    assert out == Path("o") and kw["resume"] is False


@pytest.mark.parametrize("extra, expected", [
    (["--dataset", "cora"], r"--dataset 'cora': allowed dd, enzymes, imdb-binary, mutag, mutagenicity, nci1, nci109, "
                            r"proteins$"),
    (["--model", "gcn"], r"--model 'gcn': allowed (?=.*\bet\b)(?=.*\bgin\b)(?=.*\bmlp\b)"),
    (["--protocol", "loo"], r"--protocol 'loo': allowed cv10, authors, stored$"),
    (["--fold", "10"], r"--fold 10: must be in 0\.\.9$"),
    (["--fold", "-1"], r"--fold -1: must be in 0\.\.9$"),
    (["--repeat", "-1"], r"--repeat -1: must be ≥ 0$"),
    (["--protocol", "stored", "--repeat", "1", "--dataset", "dd"], r"--repeat 1: .*0 for stored folds"),
    (["--protocol", "stored"], r"mutag ships no fold indices \(only dd do\)"),
])
def test_bad_values_are_one_error_line_naming_the_allowed_ones(extra: list[str], expected: str, cli_env: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = {"--dataset": "mutag", "--model": "et", "--fold": "0"}
    for k, v in zip(extra[::2], extra[1::2], strict=True):
        args[k] = v
    code = main(["train", "graphcls", *(x for kv in args.items() for x in kv), "--out", "never"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert re.search(expected, line), line
    assert not (cli_env / "never").exists()


def test_a_graphcls_grid_plans_with_a_finite_cost(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = cli_env / "graphcls.yaml"
    grid.write_text("name: graphcls-plan\nmodels: [et, gin, mlp]\n"
                    "base: {task: {kind: graphcls, dataset: mutag}, train: {epochs: 2}}\n"
                    "axes: {task.fold: [0, 1]}\n")
    trials = expand(load_grid(grid))
    assert sorted((t.model, t.config.task.fold) for t in trials) == [(m, f) for m in ("et", "gin", "mlp")
                                                                     for f in (0, 1)]
    costs = {t.model: estimate_cost(t) for t in trials}
    assert all(math.isfinite(c["train_pflop"]) and c["train_pflop"] > 0 for c in costs.values())
    assert costs["et"]["flops_per_sample"] > costs["gin"]["flops_per_sample"] > costs["mlp"]["flops_per_sample"]
    assert main(["sweep", "plan", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "grid graphcls-plan: 6 trials" in printed
    total = re.search(r"estimated training compute ([0-9.]+) TFLOP ≈ ([0-9.]+) CPU-trial-hours", printed)
    assert total is not None and float(total[1]) > 0 and "nan" not in printed.lower()
    assert float(total[1]) == pytest.approx(sum(2 * c["train_pflop"] for c in costs.values()) * 1e3, rel=0.01,
                                            abs=0.006)


def test_et_only_axes_give_the_graphcls_baselines_one_trial_each(cli_env: Path) -> None:
    """A ``model.et.*`` axis means nothing to GIN or the MLP (sized by model.hidden/layers): they get one trial per
    fold, not one copy per ET value."""
    grid = cli_env / "graphcls_steps.yaml"
    grid.write_text("name: graphcls-steps\nmodels: [et, gin, mlp]\n"
                    "base: {task: {kind: graphcls, dataset: mutag}, train: {epochs: 2}}\n"
                    "axes: {model.et.steps: [1, 2], task.fold: [0]}\n")
    trials = expand(load_grid(grid))
    assert sorted((t.model, t.config.model.et.steps if t.model == "et" else None) for t in trials) == [
        ("et", 1), ("et", 2), ("gin", None), ("mlp", None)]
