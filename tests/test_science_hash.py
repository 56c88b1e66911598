"""Issue 23.3: execution settings are logged but not hashed; the report keeps one run per replicate; old stores
are re-tagged by ``etbench tracking rehash`` (docs/run_identity.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from etbench.analysis import AnalysisError
from etbench.analysis.load import DUPLICATE_REASON, frame_from_wide, load_runs
from etbench.config import DistConfig, RunConfig, TrainConfig, resolve_run_config
from etbench.hashing import EXECUTION_DEFAULTS, EXECUTION_FIELDS, canonical_json, config_hash, science_dump
from etbench.tracking import schema as S

DIGITS = {"task": {"kind": "image", "dataset": "digits"}, "train": {"epochs": 1}}
KNOBS = {"train": {"checkpoint_every": 5}, "dist": {"cpus_per_worker": 2, "max_failures": 0}}


def _cfg(*overs: dict[str, Any]) -> RunConfig:
    from etbench.config import deep_merge

    over: dict[str, Any] = {}
    for o in (DIGITS, *overs):
        over = deep_merge(over, o)
    return resolve_run_config(over)


def test_execution_settings_leave_the_hash_and_defaults_keep_the_old_one() -> None:
    base = _cfg()
    assert base.hash() == config_hash(base.model_dump(mode="json"))  # byte-identical to the hash before the split
    for section, values in KNOBS.items():
        for name, value in values.items():
            cfg = _cfg({section: {name: value}})
            assert cfg.hash() == base.hash(), name
            assert cfg.flat()[f"{section}.{name}"] == value and cfg.execution()[f"{section}.{name}"] == value
    assert _cfg(KNOBS).hash() == base.hash()
    for science in ({"train": {"lr": 0.002}}, {"train": {"seed": 1}}, {"train": {"bf16": False}},
                    {"dist": {"activation_checkpointing": True}}, {"dist": {"grad_accum": 2}}):
        assert _cfg(science).hash() != base.hash(), science
    assert set(EXECUTION_FIELDS) <= set(base.flat())
    models = {"train": TrainConfig().model_dump(mode="json"), "dist": DistConfig().model_dump(mode="json")}
    declared = {k: models[k.split(".")[0]][k.split(".")[1]] for k in EXECUTION_FIELDS}
    assert canonical_json(EXECUTION_DEFAULTS) == canonical_json(declared)  # 1.0, not 1: the dump's own JSON
    dump = _cfg(KNOBS).model_dump(mode="json")
    assert science_dump(dump) == base.model_dump(mode="json") and dump["train"]["checkpoint_every"] == 5  # a copy


def _grid(tmp: Path, name: str, **changes: Any) -> Path:
    spec: dict[str, Any] = {"name": "g", "base": {"task": {"kind": "image", "dataset": "digits"},
                                                  "train": {"epochs": 2, **changes.get("train", {})},
                                                  "dist": changes.get("dist", {})},
                            "models": ["et", "vit"], "axes": {"model.et.steps": [1, 2]}, "seeds": [0, 1],
                            "resources": {"workers": 1, "cpus_per_worker": changes.get("cpus", 1)}}
    path = tmp / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_grid_changed_only_in_execution_settings_plans_the_same_hashes(tmp_path: Path) -> None:
    from etbench.sweep.grid import expand, load_grid

    before = expand(load_grid(_grid(tmp_path, "a.yaml")))
    after = expand(load_grid(_grid(tmp_path, "b.yaml", train={"checkpoint_every": 3}, dist={"max_failures": 0},
                                   cpus=2)))
    assert len(before) == 8 and [t.config_hash for t in after] == [t.config_hash for t in before]
    assert {t.config.execution()["dist.cpus_per_worker"] for t in after} == {2.0}  # the run still gets its knobs
    assert {t.config.train.checkpoint_every for t in after} == {3}
    lr = expand(load_grid(_grid(tmp_path, "c.yaml", train={"lr": 0.002})))
    assert not {t.config_hash for t in lr} & {t.config_hash for t in before}  # a science change still re-hashes


# --- the report: one run per replicate -------------------------------------------------------------------------
def _wide(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"status": "FINISHED", "task": "image", "dataset": "digits", "protocol": "masked-completion",
            "split": "-1", "paper_comparable": "false", "grid": "g", "error": None, "stage": None,
            "superseded": None, "kind": None, "run_name": "r", "end_time": 0, "artifact_uri": "x",
            "params.train.lr": "0.001", "params.train.checkpoint_every": "1", "params.dist.max_failures": "2"}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_the_loader_keeps_the_newest_run_of_a_replicate_and_lists_the_others() -> None:
    frame = _wide([
        {"run_id": "old", "model": "et", "seed": "0", "axis.model.steps": "1", "start_time": 1, "config_hash": "h1",
         "params.train.checkpoint_every": "5", "metrics.best/test/mse_masked": 0.5},
        {"run_id": "new", "model": "et", "seed": "0", "axis.model.steps": "1", "start_time": 2, "config_hash": "h0",
         "params.dist.max_failures": "0", "metrics.best/test/mse_masked": 0.4},
        {"run_id": "same-hash", "model": "et", "seed": "1", "axis.model.steps": "1", "start_time": 3,
         "config_hash": "h2", "params.train.lr": None},
        {"run_id": "same-hash-2", "model": "et", "seed": "1", "axis.model.steps": "1", "start_time": 4,
         "config_hash": "h2", "params.train.lr": None},
        {"run_id": "other-seed", "model": "et", "seed": "2", "axis.model.steps": "1", "start_time": 1,
         "config_hash": "h3"},
        {"run_id": "other-cell", "model": "et", "seed": "0", "axis.model.steps": "2", "start_time": 1,
         "config_hash": "h4"},
        *({"run_id": f"tune-{i}", "model": "vit", "seed": "0", "axis.model.steps": "1", "start_time": i,
           "config_hash": f"t{i}", "stage": "tune", "params.train.lr": str(i)} for i in range(3)),
        *({"run_id": f"fold-{i}", "model": "gin", "task": "graphcls", "seed": "0", "start_time": i,
           "config_hash": f"f{i}", "params.task.fold": str(i), "params.task.repeat": "0"} for i in range(2)),
    ])
    runs, excluded, _ = frame_from_wide(frame)
    assert sorted(runs["run_id"]) == sorted(["new", "same-hash-2", "other-seed", "other-cell", "tune-0", "tune-1",
                                             "tune-2", "fold-0", "fold-1"])
    assert list(excluded["run_id"]) == ["old", "same-hash"]
    assert list(excluded["kept_run_id"]) == ["new", "same-hash-2"]
    assert set(excluded["reason"]) == {DUPLICATE_REASON}
    # the old code analysed both copies: n = 2 for one seed of one cell
    cell = runs[(runs["model"] == "et") & (runs["axis.model.steps"] == 1)]
    assert sorted(cell["seed"]) == [0, 1, 2]


def test_the_loader_refuses_two_configs_in_one_replicate() -> None:
    frame = _wide([
        {"run_id": "a", "model": "et", "seed": "0", "axis.model.steps": "1", "start_time": 1, "config_hash": "h1"},
        {"run_id": "b", "model": "et", "seed": "0", "axis.model.steps": "1", "start_time": 2, "config_hash": "h2",
         "params.train.lr": "0.002", "params.train.checkpoint_every": "5"},
    ])
    with pytest.raises(AnalysisError, match=r"^1 replicate") as err:
        frame_from_wide(frame)
    assert "runs b: h2, a: h1; differing params: train.lr\n" in str(err.value)  # not the execution setting


# --- the migration and the loader on a real store ----------------------------------------------------------------
def _log(uri: str, cfg: RunConfig, *, hash_: str | None = None, status: str = "FINISHED", seed: int | None = None,
         steps: int = 1, start: bool = True) -> str:
    from etbench.tracking.mlflow_log import RunTracker

    tracker = RunTracker(uri, "g", "r")
    old = hash_ or config_hash(cfg.model_dump(mode="json"))  # what the store held before execution left the hash
    run_id = tracker.start(cfg, grid="g", axes={"model.et.steps": steps}, extra_tags={S.TAG_CONFIG_HASH: old})
    tracker.client.log_metric(run_id, "best/test/mse_masked", 0.1 + 0.01 * (seed or 0))
    if status != "RUNNING":
        tracker.finish(status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("rehash")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETBENCH_GIT_COMMIT", "test")  # no git subprocess per run
        ids = {"D": _log(uri, _cfg({"dist": {"max_failures": 0}}))}  # older twin of A
        ids["A"] = _log(uri, _cfg())
        ids["B"] = _log(uri, _cfg({"train": {"checkpoint_every": 5, "seed": 1}}), seed=1)
        ids["C"] = _log(uri, _cfg({"dist": {"cpus_per_worker": 2}, "model": {"et": {"steps": 2}}}), steps=2,
                        status="RUNNING")
        ids["F"] = _log(uri, _cfg({"train": {"checkpoint_every": 2}, "model": {"et": {"steps": 4}}}), steps=4,
                        hash_="0123456789ab")  # hashed by another schema version: never re-tagged
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("g").experiment_id
    e_cfg = _cfg({"train": {"checkpoint_every": 3}, "model": {"et": {"steps": 3}}})
    e_old = config_hash(e_cfg.model_dump(mode="json"))
    e = client.create_run(exp, tags={S.TAG_CONFIG_HASH: e_old, S.TAG_GRID: "g", S.TAG_TASK: "image",
                                     S.TAG_MODEL: "et", S.TAG_DATASET: "digits", S.TAG_PROTOCOL: "masked-completion",
                                     S.TAG_SEED: "0", S.TAG_SPLIT: "-1", S.TAG_AXIS_PREFIX + "model.steps": "3"})
    art = tmp / "art"
    art.mkdir()
    (art / "config.json").write_text(json.dumps({"config_hash": e_old, "config": e_cfg.model_dump(mode="json")}))
    client.log_artifact(e.info.run_id, str(art / "config.json"))  # no params: settled from config.json
    client.set_terminated(e.info.run_id, "FINISHED")
    ids["E"] = e.info.run_id
    client.create_run(exp, tags={S.TAG_KIND: S.KIND_GRID, S.TAG_GRID: "g"})  # the grid's parent: no trial
    return {"uri": uri, "ids": ids, "client": client, "new": {"E": e_cfg.hash()}}


def test_rehash_re_tags_exactly_the_runs_with_execution_settings(store: dict[str, Any],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from etbench.cli import main
    from etbench.tracking.lookup import finished_run_ids
    from etbench.tracking.rehash import TAG_CONFIG_HASH_V1, rehash

    uri, ids, client = store["uri"], store["ids"], store["client"]
    before = {k: client.get_run(v).data.tags[S.TAG_CONFIG_HASH] for k, v in ids.items()}
    assert main(["tracking", "rehash", "--tracking-uri", uri, "--experiment", "g", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would re-tag 4 run(s)" in out and f"{ids['B']} (FINISHED): {before['B']} -> " in out
    assert "train.checkpoint_every 5" in out and "1 skipped" in out
    assert {k: client.get_run(v).data.tags[S.TAG_CONFIG_HASH] for k, v in ids.items()} == before  # dry: unchanged

    res = rehash(uri, "g")
    assert {c.run_id for c in res.changed} == {ids[k] for k in "BCDE"}
    assert res.unchanged == 1 and [r for r, _ in res.skipped] == [ids["F"]]
    assert "0123456789ab" in res.skipped[0][1]
    tags = {k: client.get_run(v).data.tags for k, v in ids.items()}
    base = _cfg().hash()
    assert tags["A"][S.TAG_CONFIG_HASH] == tags["D"][S.TAG_CONFIG_HASH] == base
    assert tags["B"][S.TAG_CONFIG_HASH] == _cfg({"train": {"seed": 1}}).hash()
    assert tags["E"][S.TAG_CONFIG_HASH] == store["new"]["E"]
    assert {k for k, t in tags.items() if TAG_CONFIG_HASH_V1 in t} == set("BCDE")
    assert all(tags[k][TAG_CONFIG_HASH_V1] == before[k] for k in "BCDE")
    assert tags["F"][S.TAG_CONFIG_HASH] == "0123456789ab"
    assert set(finished_run_ids(uri, "g", base)) == {ids["A"], ids["D"]}  # the sweep's dedup now finds D too
    again = rehash(uri, "g")
    assert not again.changed and again.unchanged == 5


def test_report_loader_on_the_store_keeps_one_run_per_replicate(store: dict[str, Any]) -> None:
    ids = store["ids"]
    table = load_runs("g", store["uri"])  # before or after rehash: D and A are one replicate of one science
    assert sorted(table.runs["run_id"]) == sorted(ids[k] for k in "ABEF")
    dup = table.excluded[table.excluded["reason"] == DUPLICATE_REASON]
    assert list(dup["run_id"]) == [ids["D"]] and list(dup["kept_run_id"]) == [ids["A"]]
    assert ids["C"] in set(table.excluded["run_id"])  # RUNNING
