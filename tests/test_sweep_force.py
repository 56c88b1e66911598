"""Issue 23 item 4: ``etbench sweep run --force`` supersedes, never destroys.

A finished 2-trial grid re-run with ``--force`` (before: "0 finished, 0 failed, 2 skipped" and an empty trials/
folder) re-runs both trials; the old runs stay in MLflow tagged ``etbench.superseded`` and are left out of the
report's runs; the old trial folders are kept beside the new ones as ``<hash>.superseded-<time>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from etbench.cli import main
from etbench.tracking import schema as S

BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 64, "limit_eval": 32},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.003, "eval_trace_samples": 2}}


def _finished_grid(grid: Path, results: Path) -> str:
    """The grid's two trials run to FINISHED the way a sweep's Tune actors run them (``run_trial`` on each planned
    payload, here in this process: the Ray part of a sweep is not what --force is about); returns the store."""
    from etbench.storage import resolve_storage
    from etbench.sweep import runner

    spec, trials = runner.plan(grid)
    st = resolve_storage(results)
    uri = f"sqlite:///{results.resolve() / 'mlflow.db'}"
    res = runner._plan_trials(spec, trials, st, uri, False, False, None, False)
    for t, run_id in res.todo:
        assert runner.run_trial(runner._trial_payload(t, spec, uri, "f", st, False, run_id))["status"] == "finished"
    return uri


def test_force_reruns_every_trial_and_keeps_the_old_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from etbench.analysis.load import load_runs

    grid = tmp_path / "f.yaml"
    grid.write_text(yaml.safe_dump({"name": "f", "base": BASE, "models": ["et"], "axes": {"model.et.steps": [1, 2]},
                                    "seeds": [0], "max_concurrent_trials": 1}))
    results = tmp_path / "results"
    uri = _finished_grid(grid, results)
    assert main(["sweep", "run", str(grid), "--results", str(results)]) == 0  # nothing to do: both FINISHED
    assert "0 finished, 0 failed, 2 skipped" in capsys.readouterr().out
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("f").experiment_id
    (parent,) = [r for r in client.search_runs([exp_id]) if r.data.tags.get(S.TAG_KIND) == S.KIND_GRID]
    old = {r.info.run_id: r for r in client.search_runs([exp_id]) if r.info.run_id != parent.info.run_id}
    assert len(old) == 2 and {r.info.status for r in old.values()} == {"FINISHED"}
    # runs logged before the sweep had a parent are adopted by it (issue 28.2)
    assert {r.data.tags.get(S.TAG_PARENT_RUN) for r in old.values()} == {parent.info.run_id}
    trials = results / "f" / "trials"
    old_summary = {d.name: (d / "summary.json").read_text() for d in trials.iterdir()}
    capsys.readouterr()

    assert main(["sweep", "run", str(grid), "--results", str(results), "--force"]) == 0
    assert "2 finished, 0 failed, 0 skipped" in capsys.readouterr().out
    runs = {r.info.run_id: r for r in client.search_runs([exp_id]) if r.info.run_id != parent.info.run_id}
    assert len(runs) == 4 and {r.data.tags.get(S.TAG_PARENT_RUN) for r in runs.values()} == {parent.info.run_id}
    for run_id in old:  # the old runs: kept, FINISHED, tagged superseded with the time of the --force
        tags = runs[run_id].data.tags
        assert runs[run_id].info.status == "FINISHED" and tags[S.TAG_SUPERSEDED] == "true"
        assert tags[S.TAG_SUPERSEDED_AT].endswith("Z")
    new = [r for r in runs.values() if r.info.run_id not in old]
    assert {r.info.status for r in new} == {"FINISHED"} and all(S.TAG_SUPERSEDED not in r.data.tags for r in new)
    assert ({r.data.tags[S.TAG_CONFIG_HASH] for r in new} == {r.data.tags[S.TAG_CONFIG_HASH] for r in old.values()})
    # folders: the new trial folders, and the old ones moved aside with their results intact
    names = sorted(d.name for d in trials.iterdir())
    assert sorted(n for n in names if "." not in n) == sorted(old_summary)
    for h, text in old_summary.items():
        (aside,) = [trials / n for n in names if n.startswith(f"{h}.superseded-")]
        assert (aside / "summary.json").read_text() == text
        assert json.loads((aside / "tracking.json").read_text())["run_id"] in old
        assert json.loads((trials / h / "tracking.json").read_text())["run_id"] not in old
    # the report analyses the new runs only and says why the old ones are out
    table = load_runs("f", uri)
    assert sorted(table.runs["run_id"]) == sorted(r.info.run_id for r in new)
    assert sorted(table.excluded["run_id"]) == sorted(old)
    assert table.excluded["reason"].str.contains("--force").all()
    # a plain re-run afterwards skips both (the new runs stand for their hashes)
    assert main(["sweep", "run", str(grid), "--results", str(results)]) == 0
    assert "0 finished, 0 failed, 2 skipped" in capsys.readouterr().out
