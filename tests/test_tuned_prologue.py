"""A tuned grid passes the same prologue as a plain one (etbench.sweep.prologue): on a multi-node cluster it is
refused before anything is created when its storage or tracking store is per-node, its trials are admitted once in
the driver and pre-flighted, and its payloads carry the marker, the custom resources and ``admitted``. A stopped
tuning run is closed from MLflow's history (its folder may sit on another node); selection refuses a group whose
search evaluated more configurations than its budget. No cluster is started: its size is faked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench import storage as stg
from etbench.sweep import tune_stage
from etbench.sweep import tuning as T
from etbench.tracking import schema as S

TUNED = {
    "name": "tp",
    "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
             "train": {"batch_size": 16, "warmup_epochs": 0}, "model": {"et": {"steps": 1}}},
    "models": ["et", "vit"],
    "seeds": [0, 1],
    "resources": {"cpus_per_worker": 0.5, "custom": {"slot": 0.25}},
    "tuning": {"algorithm": "random", "search_seed": 7, "budget": {"configurations": 2, "epochs": 2},
               "scheduler": {"kind": "none"},
               "models": {"et": {"space": {"train.lr": [0.01, 0.001]}},
                          "vit": {"space": {"train.lr": [0.01, 0.001]}}}},
}


def _grid(tmp: Path, tuned: bool = True) -> Path:
    spec = dict(TUNED) if tuned else {k: v for k, v in TUNED.items() if k != "tuning"}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver is attached to a Ray cluster (so no local Ray is started) of two alive nodes."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(stg, "cluster_size", lambda: 2)
    monkeypatch.delenv(stg.ENV_STORAGE, raising=False)


def _refusal(grid: Path, **kw: Any) -> str:
    from etbench.sweep.runner import run_sweep

    with pytest.raises(stg.StorageError) as err:
        run_sweep(grid, progress=False, **kw)
    return str(err.value)


@pytest.mark.parametrize(("storage", "uri", "needles"), [
    ("results", None, ["--storage is the relative path 'results'", "(default: sqlite under the storage) is a file "
                       "store"]),
    ("ABS", "sqlite:///ABS/mlflow.db", ["is a file store"]),
])
def test_a_tuned_grid_on_two_nodes_is_refused_like_a_plain_one_before_anything_is_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_nodes: None, storage: str, uri: str | None,
        needles: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared"
    storage = storage.replace("ABS", str(shared))
    uri = uri.replace("ABS", str(shared)) if uri else None
    tuned = _refusal(_grid(tmp_path), storage=storage, tracking_uri=uri)
    assert "this Ray cluster has 2 alive nodes" in tuned and all(n in tuned for n in needles), tuned
    assert tuned == _refusal(_grid(tmp_path, tuned=False), storage=storage, tracking_uri=uri)  # the same words
    assert not (tmp_path / "results").exists() and not shared.exists()  # no store, no search state, no folder


def test_a_tuned_grid_on_a_cluster_is_admitted_and_preflighted_once_in_the_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_nodes: None) -> None:
    import etbench.admission
    import etbench.tracking.mlflow_log

    calls: dict[str, Any] = {"admit": [], "removed": []}

    def admit(configs: list[Any], custom: dict | None = None, gpus: float = 1.0) -> list:
        calls["admit"].append((len(configs), custom, gpus))
        return []

    def preflight(st: stg.Storage, configs: list[Any]) -> tuple[str, str]:
        calls["preflight"] = (st.root, len(configs), stg.dataset_refs(configs))
        return st.join("marker.txt"), "tok"

    def stages(*args: Any) -> None:  # no Tune: the payload fields the stages would hand every trial
        calls["fields"] = next((a.trial_fields() for a in args if hasattr(a, "trial_fields")), None)

    monkeypatch.setattr(etbench.admission, "admit", admit)
    monkeypatch.setattr(stg, "preflight", preflight)
    monkeypatch.setattr(stg, "remove", lambda target: calls["removed"].append(target))
    monkeypatch.setattr(etbench.tracking.mlflow_log, "ensure_experiment", lambda *a: "0")
    monkeypatch.setattr(tune_stage, "_stages", stages)
    monkeypatch.setattr(tune_stage.grid_parent, "open_parent", lambda **kw: None)
    from etbench.sweep.runner import run_sweep

    shared = tmp_path / "shared"
    run_sweep(_grid(tmp_path), storage=str(shared), tracking_uri="http://127.0.0.1:9", progress=False)
    # 2 groups × (the search's base config + 2 final seeds), in one call, with the grid's custom resources
    assert calls["admit"] == [(6, {"slot": 0.25}, 1.0)]
    assert calls["preflight"][:2] == (str(shared), 6) and [r["dataset"] for r in calls["preflight"][2]] == ["digits"]
    marker = [str(shared / "marker.txt"), "tok"]
    assert calls["fields"] == {"marker": marker, "admitted": True, "custom": {"slot": 0.25}, "gpus_per_worker": 1.0}
    assert calls["removed"] == [marker[0]]  # the marker goes when the sweep ends


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Path]:
    """One SQLite MLflow store for the module (creating one costs seconds); each test uses its own experiment."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, MlflowClient(uri), tmp


def test_tuned_payloads_and_resources_carry_the_prologue(tmp_path: Path, store: tuple[str, Any, Path]) -> None:
    from etbench.sweep.grid import load_grid

    spec = load_grid(_grid(tmp_path))
    assert tune_stage._resources(spec) == {"CPU": 0.5, "slot": 0.25}  # like runner.trial_resources
    uri, client, _ = store
    client.create_experiment("tp")
    gs = T.groups(spec)
    res = tune_stage.TunedResult("tp", "tp", uri, tmp_path, 0)
    res.selected = {g.gid: {"run_id": "r", "params": {"train.lr": 0.01}} for g in gs}
    fields = {"marker": ["/s/m.txt", "tok"], "admitted": True, "custom": {"slot": 0.25}, "gpus_per_worker": 1.0}
    payloads = tune_stage._final_payloads(spec, gs, res, uri, "tp", tmp_path / "trials", tmp_path, fields)
    assert len(payloads) == 4
    for p in payloads:
        assert p["marker"] == ["/s/m.txt", "tok"] and p["admitted"] is True and p["custom"] == {"slot": 0.25}
    dist = load_grid(_grid(tmp_path))
    dist.resources.workers = 2
    assert tune_stage._resources(dist) == {"CPU": 0.1}  # the TorchTrainer's workers reserve the rest themselves


# --- closing a stopped run ---------------------------------------------------------------------------------------
def _experiment(store: tuple[str, Any, Path], name: str) -> tuple[str, Any, str]:
    uri, client, tmp = store
    return uri, client, client.create_experiment(name, artifact_location=(tmp / "artifacts").as_uri())


def test_a_stopped_run_whose_folder_is_on_another_node_is_closed_from_mlflow(tmp_path: Path,
                                                                           store: tuple[str, Any, Path]) -> None:
    uri, client, exp = _experiment(store, "e")
    run = client.create_run(exp, tags={S.TAG_CONFIG_HASH: "h1"}).info.run_id
    empty = client.create_run(exp, tags={S.TAG_CONFIG_HASH: "h2"}).info.run_id
    val, test = [0.5, 0.3], [1.5, 1.2]
    for step, (v, t) in enumerate(zip(val, test, strict=True), start=1):  # what the trial logged per epoch
        for k, x in (("train/loss", 1.0 / step), ("val/mse_masked", v), ("test/mse_masked", t), ("lr", 0.01)):
            client.log_metric(run, k, x, step=step)
    ctx = {"uri": uri, "experiment": "e", "trials": str(tmp_path / "not-on-this-node"), "metric": "val/mse_masked",
           "mode": "min"}
    assert tune_stage._close_stopped_run(ctx, "h1", budget_epochs=4) == 2
    got = client.get_run(run)
    assert got.info.status == "FINISHED" and got.data.tags[S.TAG_STOPPED_EARLY] == "asha at epoch 2"
    m = got.data.metrics
    assert (m["best/val/mse_masked"], m["best/test/mse_masked"], m["best/epoch"]) == (0.3, 1.2, 2.0)
    assert "best/lr" not in m
    assert [(x.step, x.value) for x in client.get_metric_history(run, "val/mse_masked")] == [(1, 0.5), (2, 0.3)]
    assert tune_stage._close_stopped_run(ctx, "h1", budget_epochs=4) == 2  # idempotent
    # nothing recorded anywhere: closed KILLED with the reason, never left RUNNING
    assert tune_stage._close_stopped_run(ctx, "h2", budget_epochs=4) == 0
    gone = client.get_run(empty)
    assert gone.info.status == "KILLED" and "no metrics.json readable here" in gone.data.tags[S.TAG_CLOSED_REASON]


# --- the budget holds at selection ---------------------------------------------------------------------------------
def test_selection_refuses_a_group_with_more_configurations_than_its_budget(store: tuple[str, Any, Path]) -> None:
    from etbench.sweep.trial import SweepError

    uri, client, exp = _experiment(store, "sel")
    g = T.Group("et", {}, "et", "image", None, "val/mse_masked", "min", T.Budget(configurations=2, epochs=2))

    def run(h: str, value: float, status: str = "FINISHED") -> str:
        tags = {S.TAG_CONFIG_HASH: h, S.TAG_TUNE_GROUP: "et", S.TAG_STAGE: S.STAGE_TUNE,
                S.TAG_TUNE_PARAMS: f'{{"train.lr": {value}}}'}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(rid, "best/val/mse_masked", value)
        client.set_terminated(rid, status)
        return rid

    best = run("h1", 0.2)
    run("h2", 0.4, "FAILED")  # a diverged configuration counts against the budget
    run("h1", 0.1, "KILLED")  # a second, closed run of an evaluated hash is no extra configuration
    run("h3", 0.3, "KILLED")  # an orphan the restored search dropped was never evaluated
    assert tune_stage.select(uri, "sel", g)["run_id"] == best
    run("h4", 0.05)  # a restored search drew one configuration more than the budget
    with pytest.raises(SweepError) as err:
        tune_stage.select(uri, "sel", g)
    msg = str(err.value)
    assert "tuning group et has 3 evaluated configurations" in msg and "its budget is 2" in msg, msg


def _probe(key: str) -> Any:
    """A stand-in tuning trial: reports whether Tune handed it the group's search context."""

    def probe(config: dict[str, Any]) -> None:
        from ray import tune

        tune.report({"epoch": 2, "has_ctx": int("ctx" in config), key: 0.0})

    return probe


def test_a_search_killed_before_tunes_first_save_restores_with_its_context(tmp_path: Path) -> None:
    """Tune writes ``tuner.pkl`` when the Tuner is built, its experiment state only once the search runs: a driver
    killed in between leaves a search that ``Tuner.restore`` cannot resume, so Tune starts it afresh from the param
    space the restore was given. ``open_tuner`` hands it the group's space again: every trial gets its ``ctx`` (the
    old restore, without it, gave each trial only its sampled params — the killed-search flake)."""
    from ray import tune

    from etbench.ray_local import init_local_ray
    from etbench.sweep.grid import load_grid

    spec = load_grid(_grid(tmp_path))
    g = next(x for x in T.groups(spec) if x.model == "et")
    ctx = {"over": T.tuning_overrides(spec, g), "gid": g.gid, "metric": g.metric, "mode": g.mode}
    path, probe = tmp_path / "tune" / g.gid, _probe(T.metric_key(g.metric))
    tune_stage.open_tuner(spec, g, ctx, path, probe, progress=False)  # built, never fitted: the driver died here
    assert tune.Tuner.can_restore(str(path)) and not list(path.glob("experiment_state*"))
    init_local_ray("127.0.0.2", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune_stage.open_tuner(spec, g, ctx, path, probe, progress=False).fit()
        # a search stored by an older etbench, whose ctx had other keys: Tune refuses the new space on restore,
        # the stored state is restored without it (the search had finished: the same results come back)
        again = tune_stage.open_tuner(spec, g, {**ctx, "new_key": 1}, path, probe, progress=False).fit()
    finally:
        import ray

        ray.shutdown()
    assert len(grid) == g.budget.configurations
    assert all(r.error is None and r.metrics["has_ctx"] == 1 for r in grid), [(r.error, r.config) for r in grid]
    assert all(r.config["ctx"] == ctx for r in grid)
    assert sorted(r.path for r in again) == sorted(r.path for r in grid) and all(r.config["ctx"] == ctx for r in again)
