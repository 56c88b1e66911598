"""Ablation grids: a YAML file → validated schema → the list of trials (one resolved run config each).

A grid is a base run config (overrides of the presets), axes to sweep (lists of values for a grid axis, or a
random-search spec), seeds (and splits for graphs), the models to compare, resources per trial, concurrency and
tracking settings. Every trial's resolved config has a stable hash; axes that only an ET has (memory size, energy
terms, α, …) are not applied to baselines, whose duplicate trials are dropped. Per-model axes, ``zip:`` groups and
``derived:`` values are :mod:`etbench.sweep.axes` (docs/grids.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from etbench.config import (
    CheckpointRetention,
    ConfigError,
    GraphClsTaskConfig,
    RunConfig,
    deep_merge,
    resolve_run_config,
    set_dotted,
)
from etbench.errors import EtbenchError
from etbench.sweep import axes as A
from etbench.sweep.analysis_spec import AnalysisSpec, task_error
from etbench.sweep.axes import ET_ONLY_KEYS, RandomAxis, ZipGroup  # noqa: F401  (the first two: importable here)
from etbench.sweep.resources import Resources, deepspeed_share_error
from etbench.sweep.tuning import TuningSpec


class GridError(EtbenchError, ValueError):
    """A grid file is invalid: the message names the file, the key path and what is allowed."""


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment: str | None = Field(None, description="MLflow experiment (default: the grid name)")
    uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite under the results dir)")


class GridSpec(BaseModel):
    """The schema of ``experiments/*.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=lambda: ["et"])
    axes: dict[str, A.AxisSpec] = Field(default_factory=dict, description=(
        "dotted config key → list of values, {values: [...], models: [...]} (only those models take it), or a "
        "random-search spec"))
    zip: dict[str, ZipGroup] = Field(default_factory=dict, description=(
        "named groups of axes that move together (equal lengths): {group: {key: [...], key2: [...]}}"))
    derived: dict[str, A.DerivedSpec] = Field(default_factory=dict, description=(
        "dotted config key → arithmetic over other config keys, computed per trial after the axes "
        "(e.g. model.et.memories: 4 * model.et.dim)"))
    seeds: list[int] = Field(default_factory=lambda: [0])
    splits: list[int] | None = Field(None, description="graph anomaly detection: stored split indices (task.split); "
                                                       "graph classification: outer folds (task.fold)")
    resources: Resources = Field(default_factory=Resources)
    checkpoints: CheckpointRetention = Field(default_factory=CheckpointRetention, description=(
        "which checkpoints every trial keeps on disk (keep_last, keep_best); never the one --resume needs"))
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0, description="retries of a trial that crashed (not of a diverged one)")
    search_seed: int = 0
    tracking: Tracking = Field(default_factory=Tracking)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, description=(
        "what the report needs to know (equivalence_margins: metric → δ); part of no trial's config hash"))
    tuning: TuningSpec | None = Field(None, description="a search stage per model, then a final stage over the seeds "
                                                        "(etbench.sweep.tuning)")
    storage: str | None = Field(None, description=(
        "where results, Ray storage and checkpoints go: a shared POSIX path or a URI such as s3://bucket/x "
        "(default: --storage, $ETBENCH_STORAGE, ./results)"))

    @field_validator("axes")
    @classmethod
    def _non_empty(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, vals in v.items():
            if isinstance(vals, list) and not vals:
                raise ValueError(f"axis {k!r} has no values")
        return v

    @field_validator("seeds", "models")
    @classmethod
    def _non_empty_list(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("must list at least one value")
        return v


class Trial(BaseModel):
    """One run of a grid: its resolved config, hash, model, seed/split and the axis values it takes."""

    model_config = ConfigDict(frozen=True)

    config: RunConfig
    config_hash: str
    model: str
    seed: int
    split: int | None
    axes: dict[str, Any]
    derived: dict[str, Any] = Field(default_factory=dict, description="values computed by the grid's derived:")

    @property
    def run_name(self) -> str:
        bits = [self.model] + [f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()] + [f"seed={self.seed}"]
        if self.split is not None:
            bits.append(f"split={self.split}")
        return " ".join(bits)


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid file (``yaml.safe_load``); errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file must be a mapping with keys {', '.join(GridSpec.model_fields)}")
    try:
        spec = GridSpec.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: invalid grid:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in A.error_path(e["loc"]))
            extra = f" (allowed keys: {', '.join(GridSpec.model_fields)})" if e["type"] == "extra_forbidden" and len(
                e["loc"]) == 1 else ""
            lines.append(f"  {loc}: {e['msg']}{extra}")
        raise GridError("\n".join(lines)) from None
    trials = expand(spec, source=str(path))  # validates every axis path, model and value now, before anything starts
    if why := task_error(spec.analysis, {t.config.task.kind for t in trials}):
        raise GridError(f"{path}: {why}")
    if spec.tuning is not None:
        from etbench.sweep.tuning import validate

        validate(spec, source=str(path))
    return spec


def _is_et_only(key: str, kind: str | None) -> bool:
    """Whether axis ``key`` means nothing to a baseline of task ``kind`` (see :func:`etbench.sweep.axes.is_et_only`)."""
    return A.is_et_only(key, kind)


def _base(spec: GridSpec) -> dict[str, Any]:
    return deep_merge(spec.base, {"dist": {"workers": spec.resources.workers,
                                           "cpus_per_worker": spec.resources.cpus_per_worker,
                                           "use_gpu": spec.resources.use_gpu,
                                           "zero_stage": spec.resources.zero_stage}})


def model_combos(spec: GridSpec, source: str = "grid") -> list[tuple[str, dict[str, Any]]]:
    """(model, the axis values that apply to it) for every model × axis combination, in grid order; a baseline
    ignores ET-only axes and a model ignores per-model axes that do not name it, so duplicates are dropped."""
    return A.combos(spec, source, GridError)


def trial_overrides(spec: GridSpec, model: str, applied: dict[str, Any], seed: int,
                    split: int | None, source: str = "grid") -> dict[str, Any]:
    """The override dict of one trial: grid base + resources, model, seed, split, its axis values, then its derived
    values."""
    return A.derive(spec, model, _axis_overrides(spec, model, applied, seed, split), source, GridError)[0]


def _axis_overrides(spec: GridSpec, model: str, applied: dict[str, Any], seed: int,
                    split: int | None) -> dict[str, Any]:
    over = set_dotted(_base(spec), "model.name", model)
    over = set_dotted(over, "train.seed", seed)
    if split is not None:  # a graph classification grid's splits are its outer folds (task.fold)
        kind = applied.get("task.kind", (spec.base.get("task") or {}).get("kind"))
        over = set_dotted(over, "task.fold" if kind == "graphcls" else "task.split", split)
    for n, v in applied.items():
        over = set_dotted(over, n, v)
    return over


def expand(spec: GridSpec, source: str = "grid") -> list[Trial]:
    """All trials of the grid (models × axis values × seeds × splits), deduplicated by config hash.

    For a grid with a ``tuning:`` section these are the final stage's slots at the base hyper-parameters (the
    stages themselves are planned by :mod:`etbench.sweep.tuning`)."""
    trials: dict[str, Trial] = {}
    splits: list[int | None] = list(spec.splits) if spec.splits is not None else [None]
    taken: set[str] = set()
    for model, applied in model_combos(spec, source):
        for seed in spec.seeds:
            for split in splits:
                where = f"{source} (model={model}, {applied}, seed={seed})"
                over, derived = A.derive(spec, model, _axis_overrides(spec, model, applied, seed, split), where,
                                         GridError)
                taken.update(derived)
                try:
                    cfg = resolve_run_config(over, source=where)
                except ConfigError as e:
                    raise GridError(str(e)) from None
                if why := deepspeed_share_error(spec.resources, cfg):
                    raise GridError(f"{where}: {why}")
                h = cfg.hash()
                trials.setdefault(h, Trial(config=cfg, config_hash=h, model=model, seed=seed, split=split,
                                           axes=applied, derived=derived))
    A.unused_derived(spec, source, GridError, taken)
    return list(trials.values())


def estimate_cost(trial: Trial) -> dict[str, float]:
    """Rough training cost: 3 × forward FLOPs per sample × samples per epoch × epochs (images; NaN if unknown)."""
    cfg = trial.config
    if isinstance(cfg.task, GraphClsTaskConfig):
        return _graphcls_cost(cfg.task, cfg)
    if cfg.task.kind != "image":
        return _graph_cost(trial)
    from etbench.models import registry

    preset = registry.IMAGE_PRESETS[cfg.task.dataset]
    name = cfg.model.name
    inputs = {"image_shape": preset.image_shape, "patch": cfg.task.patch or preset.patch,
              **registry.options("image", name, cfg.model)}
    n = cfg.task.limit_train or DATASET_TRAIN_SIZES.get(cfg.task.dataset, 0)
    flops = registry.flops("image", name, **inputs)
    return {"flops_per_sample": flops, "params": float(registry.num_parameters("image", name, **inputs)),
            "train_pflop": 3 * flops * n * cfg.train.epochs / 1e15}


DATASET_TRAIN_SIZES = {"digits": 1294, "mnist": 54000, "cifar10": 45000, "imagenet": 1_153_050}


# (nodes, directed edges without self-loops, features) of the graphs etbench knows; used only for cost estimates.
GRAPH_SIZES = {
    "facebook": (1081, 55_104, 576), "amazon_upu": (10_224, 351_216, 25), "tolokers": (11_758, 1_038_000, 10),
    "reddit": (10_984, 157_032, 64), "yelpchi": (45_954, 7_693_958, 32), "amazon": (11_944, 8_796_784, 25),
    "tfinance": (39_357, 42_445_086, 10), "tsocial": (5_781_065, 146_211_774, 10), "synthetic": (1000, 10_000, 16),
}


# Effective FLOP/s for turning FLOPs into hours (FLOP/s per trial). Images: dense matmuls. Graphs: gathers, sparse
# matmuls and scatters run far below peak — measured on 2 CPU cores (one thread per trial), full-graph training with
# evaluation every epoch: graph ET ~8, GCN/BWGNN ~3, GAT <1 GFLOP/s; 2.5 reproduces the wall time of
# experiments/graph_reproduction.yaml (~2.5 CPU-trial-hours). The GPU figure for graphs is a guess.
# Graph classification: the reduced ENZYMES and PROTEINS grids (docs/graph_classification.md, 2026-12-07, a quiet
# 2-core machine, two one-thread trials side by side) ran their final stages at 20 and 25 GFLOP/s of this plan's
# count per trial, wall time incl. evaluation (ET runs 16-21, GIN 14-16; the sum-pool MLP is overhead-bound, ~1-3);
# 15 leaves room for a busier machine (a MUTAG fold on 2 cores at load average 13 measured only 0.3-0.4). The GPU
# figure is a guess (kernel launches dominate at these graph sizes).
EFFECTIVE_FLOPS = {"image": {"cpu": 60e9, "gpu": 200e12}, "graph": {"cpu": 2.5e9, "gpu": 2e12},
                   "graphcls": {"cpu": 15e9, "gpu": 50e9}}


def estimate_seconds(trial: Trial) -> float:
    """The plan's wall-time guess for one trial at the effective rates above (GPU rate when the trial asks for a
    GPU); NaN where the cost is unknown."""
    pflop = estimate_cost(trial)["train_pflop"]
    rate = EFFECTIVE_FLOPS[trial.config.task.kind]["gpu" if trial.config.dist.use_gpu else "cpu"]
    return pflop * 1e15 / rate


def _graph_cost(trial: Trial) -> dict[str, float]:
    """Full-graph training cost: (3 for training + 1 for the per-epoch evaluation) × forward FLOPs per node × nodes
    × epochs (NaN for unknown graphs)."""
    cfg = trial.config
    size = GRAPH_SIZES.get(cfg.task.dataset)
    if size is None:
        return {"flops_per_sample": float("nan"), "train_pflop": float("nan")}
    from etbench.models import registry

    n, e, f = size
    name = cfg.model.name
    flops = registry.flops("graph", name, in_dim=f, num_nodes=n, num_edges=e,
                           **registry.options("graph", name, cfg.model))
    return {"flops_per_sample": flops, "train_pflop": 4 * flops * n * cfg.train.epochs / 1e15}


# (graphs, nodes, directed edges without self-loops, node features, features without node attributes, classes) of
# the TU sets as etbench.data.tudataset loads them; used only for cost estimates.
TU_SIZES = {
    "mutag": (188, 3371, 7442, 7, 7, 2), "proteins": (1113, 43471, 162088, 4, 3, 2),
    "nci1": (4110, 122747, 265506, 37, 37, 2), "nci109": (4127, 122494, 265208, 38, 38, 2),
    "enzymes": (600, 19580, 74564, 21, 3, 6), "imdb-binary": (1000, 19773, 193062, 136, 136, 2),
    "mutagenicity": (4337, 131488, 266894, 14, 14, 2), "dd": (1178, 334925, 1686092, 82, 82, 2),
}


def _graphcls_cost(task: GraphClsTaskConfig, cfg: RunConfig) -> dict[str, float]:
    """Graph classification: (3 × training graphs + 1 × evaluated graphs) × forward FLOPs of the mean graph × epochs.

    Assumes the registry FLOPs at the dataset's mean node and edge count are the mean per graph (they are linear in
    both); training graphs are 9/10 × (1 − val_fraction) of the set (cv10, stored; all of it under ``authors``);
    every epoch evaluates each graph once (train, val and test; under ``authors`` the test tenth twice). Padding,
    the Laplacian PE and data loading are not counted. NaN for a set missing from ``TU_SIZES``.
    """
    size = TU_SIZES.get(task.dataset)
    if size is None:
        return {"flops_per_sample": float("nan"), "train_pflop": float("nan")}
    from etbench.models import registry

    graphs, nodes, edges, feats, feats_no_attr, classes = size
    name = cfg.model.name
    flops = registry.flops("graphcls", name, in_dim=feats if task.node_attributes else feats_no_attr,
                           num_classes=classes, pe_dim=task.pe_dim, num_nodes=nodes / graphs,
                           num_edges=edges / graphs, **registry.options("graphcls", name, cfg.model))
    authors = task.protocol == "authors"
    train = graphs if authors else graphs * 0.9 * (1 - task.val_fraction)
    evaluated = graphs * (1.1 if authors else 1.0)
    return {"flops_per_sample": flops, "train_pflop": (3 * train + evaluated) * flops * cfg.train.epochs / 1e15}
