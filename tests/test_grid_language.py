"""The grid language (issue 28.1): zip groups, per-model axes and derived values expand to exact, hand-listed trial
sets; bad ones are refused naming the file and key; every shipped grid expands to the trial hashes it had before."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from etbench.cli import main
from etbench.sweep.expr import ExprError, evaluate, names
from etbench.sweep.grid import GridError, Trial, expand, load_grid

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "grid_hashes.json"
BASE = {"task": {"kind": "image", "dataset": "digits", "limit_train": 32, "limit_eval": 16},
        "train": {"epochs": 1, "batch_size": 16}}


def write(tmp: Path, **over: Any) -> Path:
    spec = {"name": "g", "base": BASE, "models": ["et"], "seeds": [0], **over}
    path = tmp / "g.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cells(trials: list[Trial], *keys: str) -> list[tuple[Any, ...]]:
    """(model, the resolved value of each dotted key) per trial, in expansion order."""
    def get(t: Trial, key: str) -> Any:
        node: Any = t.config
        for part in key.split("."):
            node = getattr(node, part)
        return node

    return [(t.model, *(get(t, k) for k in keys)) for t in trials]


# --- zip groups ------------------------------------------------------------------------------------------------
def test_zip_group_moves_together_and_crosses_the_other_axes(tmp_path: Path) -> None:
    path = write(tmp_path, axes={"model.et.terms": ["attn+hn", "hn"]},
                 zip={"alpha_T": {"model.et.steps": [1, 2, 4], "model.et.alpha": [0.4, 0.2, 0.1]}})
    trials = expand(load_grid(path))
    assert cells(trials, "model.et.terms", "model.et.steps", "model.et.alpha") == [
        ("et", "attn+hn", 1, 0.4), ("et", "attn+hn", 2, 0.2), ("et", "attn+hn", 4, 0.1),
        ("et", "hn", 1, 0.4), ("et", "hn", 2, 0.2), ("et", "hn", 4, 0.1)]
    assert trials[1].axes == {"model.et.terms": "attn+hn", "model.et.steps": 2, "model.et.alpha": 0.2}
    assert len({t.config_hash for t in trials}) == 6


def test_zip_with_a_baseline_keeps_the_keys_it_has(tmp_path: Path) -> None:
    """vit takes steps (its depth) but not α (ET-only): the zip's repeated steps collapse into one trial each."""
    path = write(tmp_path, models=["et", "vit"],
                 zip={"arms": {"model.et.steps": [2, 4, 2, 4], "model.et.alpha": [0.1, 0.1, 0.2, 0.05]}})
    assert cells(expand(load_grid(path)), "model.et.steps", "model.et.alpha") == [
        ("et", 2, 0.1), ("et", 4, 0.1), ("et", 2, 0.2), ("et", 4, 0.05), ("vit", 2, 0.1), ("vit", 4, 0.1)]


def test_unequal_zip_lengths_are_refused_naming_file_group_keys_and_lengths(tmp_path: Path) -> None:
    path = write(tmp_path, zip={"alpha_T": {"model.et.steps": [1, 2, 4], "model.et.alpha": [0.4, 0.2]}})
    with pytest.raises(GridError) as err:
        load_grid(path)
    msg = str(err.value)
    assert str(path) in msg and "zip.alpha_T" in msg and "model.et.steps: 3" in msg and "model.et.alpha: 2" in msg


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"zip": {"z": {"model.et.stepz": [1, 2], "model.et.alpha": [0.1, 0.2]}}}, "model.et.stepz"),
        ({"zip": {"z": {}}}, "at least one axis"),
        ({"zip": {"z": {"model.et.steps": 3}}}, "z.model.et.steps"),
        ({"axes": {"model.et.steps": [1]}, "zip": {"z": {"model.et.steps": [1, 2]}}},
         "'model.et.steps' is already swept by axes.model.et.steps"),
        ({"zip": {"z": {"model.et.steps": [1, 2], "models": ["gcn"]}}}, "zip.z.models: 'gcn' is not one of"),
    ],
)
def test_bad_zip_groups_are_refused(tmp_path: Path, over: dict[str, Any], needle: str) -> None:
    path = write(tmp_path, **over)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert needle in str(err.value) and str(path) in str(err.value)


# --- per-model axes --------------------------------------------------------------------------------------------
def test_per_model_axis_gives_the_other_models_one_trial(tmp_path: Path) -> None:
    path = write(tmp_path, models=["et", "vit"], seeds=[0, 1],
                 axes={"model.et.steps": [2, 4], "train.lr": {"values": [0.001, 0.01], "models": ["vit"]}})
    trials = expand(load_grid(path))
    assert [(t.model, t.config.model.et.steps, t.config.train.lr, t.seed) for t in trials] == [
        ("et", 2, 0.001, 0), ("et", 2, 0.001, 1), ("et", 4, 0.001, 0), ("et", 4, 0.001, 1),
        ("vit", 2, 0.001, 0), ("vit", 2, 0.001, 1), ("vit", 2, 0.01, 0), ("vit", 2, 0.01, 1),
        ("vit", 4, 0.001, 0), ("vit", 4, 0.001, 1), ("vit", 4, 0.01, 0), ("vit", 4, 0.01, 1)]
    assert "train.lr" not in trials[0].axes and trials[6].axes == {"model.et.steps": 2, "train.lr": 0.01}


def test_per_model_zip_and_random_axes(tmp_path: Path) -> None:
    path = write(tmp_path, models=["et", "vit"],
                 axes={"train.weight_decay": {"distribution": "choice", "values": [0.0, 0.5], "samples": 1,
                                              "models": ["et"]}},
                 zip={"depth_lr": {"models": ["vit"], "model.et.steps": [2, 6], "train.lr": [0.003, 0.001]}})
    trials = expand(load_grid(path))
    wd = trials[0].config.train.weight_decay
    assert wd in (0.0, 0.5)
    assert cells(trials, "model.et.steps", "train.lr", "train.weight_decay") == [
        ("et", 12, 0.001, wd), ("vit", 2, 0.003, 0.05), ("vit", 6, 0.001, 0.05)]


@pytest.mark.parametrize(
    ("axes", "needle"),
    [
        ({"train.lr": {"values": [0.1], "models": ["gat"]}}, "axes.train.lr.models: 'gat' is not one of the grid's "
                                                             "models (et, vit)"),
        ({"model.et.alpha": {"values": [0.1, 0.2], "models": ["vit"]}}, "applies to none of its models (vit)"),
        ({"train.lr": {"values": [], "models": ["vit"]}}, "axes.train.lr.values: List should have at least 1"),
        ({"train.lr": {"values": [0.1], "models": []}}, "axes.train.lr.models: List should have at least 1"),
        ({"train.lr": {"values": [0.1], "modles": ["vit"]}}, "modles"),
        ({"train.lr": 0.1}, "an axis is a list of values"),
        ({"train.lr": {"distribution": "uniform", "low": 0.1, "high": 0.01, "samples": 2}}, "axes.train.lr: a "
                                                                                              "'uniform' axis needs"),
    ],
)
def test_bad_per_model_axes_are_refused(tmp_path: Path, axes: dict[str, Any], needle: str) -> None:
    path = write(tmp_path, models=["et", "vit"], axes=axes)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert needle in str(err.value) and str(path) in str(err.value)


# --- derived values --------------------------------------------------------------------------------------------
def test_derived_values_follow_the_axes(tmp_path: Path) -> None:
    path = write(tmp_path, models=["et", "vit"],
                 axes={"model.et.dim": [32, 64], "model.et.steps": [2, 4]},
                 derived={"model.et.memories": "4 * model.et.dim",
                          "model.et.heads": "max(1, model.et.dim // 32)",
                          "model.et.alpha": "0.4 / model.et.steps",
                          "train.lr": {"expr": "0.1 / model.et.heads", "models": ["vit"]}})
    trials = expand(load_grid(path))
    assert cells(trials, "model.et.dim", "model.et.steps", "model.et.memories", "model.et.heads", "model.et.alpha",
                 "train.lr") == [
        ("et", 32, 2, 128, 1, 0.2, 0.001), ("et", 32, 4, 128, 1, 0.1, 0.001),
        ("et", 64, 2, 256, 2, 0.2, 0.001), ("et", 64, 4, 256, 2, 0.1, 0.001),
        ("vit", 32, 2, 256, 1, 0.1, 0.1), ("vit", 32, 4, 256, 1, 0.1, 0.1),  # memories, α: the preset's, unused
        ("vit", 64, 2, 256, 2, 0.1, 0.05), ("vit", 64, 4, 256, 2, 0.1, 0.05)]
    assert trials[2].derived == {"model.et.memories": 256, "model.et.heads": 2, "model.et.alpha": 0.2}
    assert trials[6].derived == {"model.et.heads": 2, "train.lr": 0.05}  # vit takes neither memories nor α
    assert trials[2].axes == {"model.et.dim": 64, "model.et.steps": 2}


def test_derived_value_reads_base_and_preset_keys(tmp_path: Path) -> None:
    """No axis at all: α·T fixed at 0.6 for the preset's T = 12 (digits preset D = 64 → memories 4·64)."""
    trials = expand(load_grid(write(tmp_path, derived={"model.et.alpha": "0.6 / model.et.steps",
                                                       "model.et.memories": "model.et.dim * 4"})))
    assert cells(trials, "model.et.steps", "model.et.alpha", "model.et.dim", "model.et.memories") == [
        ("et", 12, pytest.approx(0.05), 64, 256)]


@pytest.mark.parametrize(
    ("derived", "needle"),
    [
        ({"model.et.memories": "4 * model.et.dimm"}, "derived.model.et.memories: '4 * model.et.dimm': unknown key "
                                                     "'model.et.dimm'"),
        ({"model.et.memories": "__import__('os').getcwd()"}, "is not allowed"),
        ({"model.et.memories": "4 *"}, "derived.model.et.memories"),
        ({"model.et.memories": "[4][0]"}, "is not allowed"),
        ({"model.et.alpha": "model.et.alpha / 2"}, "reads 'model.et.alpha', which is derived by this entry"),
        ({"model.et.alpha": "1 / model.et.heads", "model.et.heads": "2"}, "derived below it"),
        ({"model.et.alpha": "1 / (model.et.steps - 12)"}, "derived.model.et.alpha: '1 / (model.et.steps - 12)': "
                                                          "division by zero"),
        ({"model.et.memories": "model.et.memories + 1"}, "derived by this entry"),
        ({"model.et.memories": "4 * model.et.mem_ratio + model.et.self_attention"}, "not a number"),
        ({"model.et.memoriez": "4"}, "model.et.memoriez"),
        ({"train.lr": {"expr": "0.1", "models": ["gin"]}}, "derived.train.lr.models: 'gin' is not one of"),
        ({"model.et.steps": "2"}, "derived.model.et.steps: also swept by axes.model.et.steps"),
        ({"model.et.memories": ["4"]}, "derived.model.et.memories.expr"),
    ],
)
def test_bad_derived_values_are_refused_naming_the_key(tmp_path: Path, derived: dict[str, Any], needle: str) -> None:
    path = write(tmp_path, axes={"model.et.steps": [12]}, derived=derived)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert needle in str(err.value) and str(path) in str(err.value), str(err.value)


def test_derived_value_may_not_follow_a_searched_key(tmp_path: Path) -> None:
    tuning = {"budget": {"configurations": 2, "epochs": 2}, "seed": 100,
              "models": {"et": {"space": {"model.et.dim": [32, 64]}}}}
    base = {**BASE, "train": {**BASE["train"], "warmup_epochs": 0}}
    path = write(tmp_path, base=base, tuning=tuning, derived={"model.et.memories": "4 * model.et.dim"})
    with pytest.raises(GridError, match=r"derived.model.et.memories: .* searched by tuning.models.et.space"):
        load_grid(path)
    ok = write(tmp_path, base=base, tuning=tuning, axes={"model.et.steps": [2]},
               derived={"model.et.alpha": "0.4 / model.et.steps"})
    from etbench.sweep import tuning as T

    spec = load_grid(ok)
    (g,) = T.groups(spec, str(ok))
    assert T.tuning_config(spec, g, {"model.et.dim": 32}).model.et.alpha == 0.2  # tuning and final configs get it
    assert {c.model.et.alpha for _, _, c in T.final_configs(spec, g, {"model.et.dim": 32})} == {0.2}


def test_the_expression_language_by_hand() -> None:
    values = {"a.b": 6, "c": 2.5, "flag": True}
    assert evaluate("a.b * 4 + 1", values) == 25 and evaluate("a.b // 4", values) == 1
    assert evaluate("-(a.b - 10) ** 2 % 7", values) == -16 % 7 and evaluate("a.b / 4", values) == 1.5
    assert evaluate("round(c) + min(a.b, 3) + abs(-1) + int(c)", values) == 2 + 3 + 1 + 2
    assert names("max(1, a.b // c) + a.b") == ["a.b", "c"]
    for bad in ("flag + 1", "2 ** 100", "'x'", "a.b if c else 1", "min(a.b, key=1)", "c.real", "lambda: 1",
                "1e308 * 10", "print(1)"):
        with pytest.raises(ExprError):
            evaluate(bad, values)


# --- the plan shows the layout ---------------------------------------------------------------------------------
def test_sweep_plan_shows_zip_per_model_and_derived(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, models=["et", "vit"],
                 axes={"train.lr": {"values": [0.001, 0.01], "models": ["vit"]}},
                 zip={"alpha_T": {"model.et.steps": [2, 4], "model.et.alpha": [0.2, 0.1]}},
                 derived={"model.et.memories": "4 * model.et.dim"})
    assert main(["sweep", "plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "axis train.lr: [0.001, 0.01]  (only vit; other models: one trial)" in out
    assert "zip alpha_T (2 points, moving together):\n    model.et.steps: [2, 4]\n    model.et.alpha: [0.2, 0.1]" in out
    assert "derived model.et.memories = 4 * model.et.dim" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+[0-9a-f]{12}\s", line)]
    assert len(rows) == 2 + 4
    assert "model.et.steps=4 model.et.alpha=0.1 model.et.memories:=256" in rows[1]
    assert "seed=0  train.lr=0.01 model.et.steps=2  ~" in rows[4]  # vit: no derived memories (ET-only)


# --- shipped grids: same trials as before the grid language ----------------------------------------------------
# tests/fixtures/grid_hashes.json was recorded from commit bf4925f (before the grid language) with grid_entry below.
# A grid edited on purpose later gets its entry re-recorded with grid_entry; one converted to the new syntax keeps its
# hashes and is listed here with how its run names (axis tags) changed.
CONVERTED = {"graph_dynamics_amazon.yaml": re.compile(
    r"et terms=(attn\+hn|hn) steps=[1248] alpha=(0\.5|0\.25|0\.125|0\.0625) seed=0 split=[0-4]"),
    "graph_dynamics_tolokers.yaml": re.compile(
    r"et terms=(attn\+hn|hn) steps=[1248] alpha=(1|0\.5|0\.25|0\.125) seed=0 split=[0-4]")}


def grid_entry(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The recorded form of a grid's expansion (and its run names, for the converted grids)."""
    spec = load_grid(path)
    trials = expand(spec, source=str(path))
    entry: dict[str, Any] = {
        "trials": [f"{t.config_hash} {t.model} seed={t.seed} split={t.split}" for t in trials],
        "run_names_sha256": hashlib.sha256("\n".join(t.run_name for t in trials).encode()).hexdigest()}
    if spec.tuning is not None:
        from etbench.sweep import tuning as T

        entry["tuning_groups"] = [f"{g.gid} {T.tuning_config(spec, g, {}, str(path)).hash()}"
                                  for g in T.groups(spec, str(path))]
    return entry, [t.run_name for t in trials]


def test_shipped_grids_expand_to_the_recorded_trials() -> None:
    recorded = json.loads(FIXTURE.read_text())
    shipped = sorted(p.name for p in (REPO / "experiments").glob("*.yaml"))
    assert set(recorded) <= set(shipped), "a recorded grid is gone from experiments/"
    assert len(recorded) >= 25
    for name, want in recorded.items():
        got, run_names = grid_entry(REPO / "experiments" / name)
        assert got["trials"] == want["trials"], f"{name}: trial hashes changed"
        assert got.get("tuning_groups") == want.get("tuning_groups"), f"{name}: tuning groups changed"
        if name in CONVERTED:
            assert all(CONVERTED[name].fullmatch(r) for r in run_names), (name, run_names[:3])
        else:
            assert got["run_names_sha256"] == want["run_names_sha256"], f"{name}: run names (axis tags) changed"
