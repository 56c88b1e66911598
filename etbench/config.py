"""Typed run configuration: one resolved ``RunConfig`` = one run, identified by the hash of its JSON with the
execution settings (``etbench.hashing.EXECUTION_FIELDS``: retries, CPUs per worker, checkpoint cadence) at their
defaults.

A user (CLI, YAML grid) gives a nested dict of *overrides*; :func:`resolve_run_config` lays them over the dataset
preset (model sizes) and the defaults, validates everything and returns the full config. Validation errors name
the key path and the allowed values.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from etbench.errors import EtbenchError
from etbench.hashing import EXECUTION_FIELDS, flatten, science_hash
from etbench.models.et_config import ETConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageTaskConfig(_Strict):
    """Masked image completion on one dataset (SPEC §2)."""

    kind: Literal["image"] = "image"
    dataset: Literal["digits", "mnist", "cifar10", "imagefolder", "imagenet"] = "digits"
    root: str | None = None
    mask_ratio: float = Field(0.5, gt=0, le=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    limit_train: int | None = Field(None, ge=1)
    limit_eval: int | None = Field(None, ge=1)
    image_size: int = Field(224, ge=8)
    patch: int | None = Field(None, ge=1, description="patch size; null = the dataset preset's")


class GraphTaskConfig(_Strict):
    """Node-level graph anomaly detection (SPEC §3)."""

    kind: Literal["graph"] = "graph"
    dataset: str = "synthetic"
    path: str | None = None
    protocol: Literal["bwgnn", "gadbench"] = "bwgnn"
    train_ratio: float = Field(0.4, gt=0, lt=1)
    split: int = Field(0, ge=0, description="stored split index (gadbench)")
    batch_nodes: int | None = Field(None, ge=1, description="seed nodes per sampled mini-batch; null = full graph")
    hops: int = Field(2, ge=1)


class GraphClsTaskConfig(_Strict):
    """Graph classification on one fold of a TU dataset (SPEC §5; ``etbench.tasks.graphcls_folds``)."""

    kind: Literal["graphcls"] = "graphcls"
    dataset: Literal["mutag", "proteins", "nci1", "nci109", "enzymes", "imdb-binary", "mutagenicity", "dd"] = "mutag"
    path: str | None = Field(None, description="zip or directory; null = tudataset/<NAME>.zip under the data root")
    protocol: Literal["cv10", "authors", "stored"] = "cv10"
    fold: int = Field(0, ge=0, description="outer fold index")
    repeat: int = Field(0, ge=0, description="repetition (fold seed fold_seed + repeat)")
    fold_seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="inner holdout of the training folds")
    pe_dim: int = Field(15, ge=0, description="Laplacian eigenvectors k (0: none)")
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    node_attributes: bool = Field(True, description="include continuous node attributes (PROTEINS, ENZYMES)")


class ModelConfig(_Strict):
    """Registry name plus the ET sizes (baselines reuse width/heads/T) and baseline knobs."""

    name: str = "et"
    et: ETConfig = Field(default_factory=ETConfig)
    mlp_ratio: float = Field(4.0, gt=0)
    hidden: int = Field(64, ge=1, description="GNN baselines' hidden width")
    layers: int = Field(2, ge=1, description="GNN baselines' depth")
    param: Literal["standard", "mup"] = Field(
        "standard", description="image models' width parametrisation: mup = μP (etbench.models.width_param)")
    base_width: int = Field(64, ge=1, description="μP: the width at which mup equals standard (lr/init reference)")
    pm_shape: Literal["width", "width-depth"] = Field(
        "width", description="vit-pm's search: width alone at depth T, or width × depth with heads ≥ 8 wide")

    @model_serializer(mode="wrap")
    def _defaults_unlisted(self, handler: Any) -> Any:
        """Leave ``param``/``base_width`` (standard parametrisation) and ``pm_shape`` (``width``) out of the dump, so
        out of the run hash: every run hashed before these options existed keeps its hash and its meaning."""
        data = handler(self)
        if isinstance(data, dict):
            if self.param == "standard":
                data.pop("param", None)
                data.pop("base_width", None)
            if self.pm_shape == "width":
                data.pop("pm_shape", None)
        return data


class TrainConfig(_Strict):
    """Optimisation (AdamW, linear warm-up then cosine, clipping) and evaluation cadence."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (split over workers × accumulation)")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    eval_trace_samples: int = Field(16, ge=1, description="validation images whose energy trace is recorded")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")


class CheckpointRetention(_Strict):
    """Which of a run's checkpoints stay on disk (a grid's ``checkpoints:``; etbench.engine.retention).

    The latest checkpoint — what ``--resume`` continues from, and the final model that the dynamics analysis
    reads — is always kept. Not part of any run's config hash: what is kept on disk never changes the result.
    ``keep_last`` > 1 together with ``keep_best`` > 0 is refused: Ray Train's ``CheckpointConfig`` (the
    distributed runs' checkpoints) keeps either the N most recent checkpoints or the N best plus the latest."""

    keep_last: int = Field(1, ge=1, description="the most recent checkpoints kept (>= 1: the latest is the resume "
                                                "point)")
    keep_best: int = Field(1, ge=0, description="also keep the checkpoints of the best validation metric (the "
                                                "run's best-epoch selection metric); 0: none")

    @model_validator(mode="after")
    def _one_order(self) -> CheckpointRetention:
        if self.keep_last > 1 and self.keep_best > 0:
            raise ValueError(f"keep_last {self.keep_last} with keep_best {self.keep_best}: checkpoints are kept "
                             f"either by recency (keep_last: N, keep_best: 0) or by validation metric plus the "
                             f"latest (keep_last: 1, keep_best: N)")
        return self


class DistConfig(_Strict):
    """How a run is executed: one process, or a Ray Train job whose workers run DeepSpeed ZeRO."""

    workers: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    use_gpu: bool = False
    grad_accum: int = Field(1, ge=1)
    activation_checkpointing: bool = False
    offload: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    deepspeed: bool = Field(False, description="run under DeepSpeed even with one worker")

    @property
    def in_process(self) -> bool:
        """The one rule for where a run trains: in the calling process (one worker, no DeepSpeed:
        :func:`etbench.engine.tracked.run_tracked`) or as a Ray Train job of DeepSpeed ranks
        (:func:`etbench.engine.launch.fit`)."""
        return self.workers == 1 and not self.deepspeed


class RunConfig(_Strict):
    """One fully resolved run."""

    task: Annotated[ImageTaskConfig | GraphTaskConfig | GraphClsTaskConfig, Field(discriminator="kind")]
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    @model_validator(mode="after")
    def _model_fits_task(self) -> RunConfig:
        allowed = allowed_models(self.task.kind)
        if self.model.name not in allowed:
            raise ValueError(f"model.name {self.model.name!r} is not a {self.task.kind} model; allowed: "
                             f"{', '.join(allowed)}")
        if not model_differentiable(self.task.kind, self.model.name):  # fitted by its own step, full graph
            bad = [f"{k} {v}" for k, v, ok in (("dist.workers", self.dist.workers, self.dist.workers == 1),
                                               ("dist.deepspeed", self.dist.deepspeed, not self.dist.deepspeed),
                                               ("task.batch_nodes", getattr(self.task, "batch_nodes", None),
                                                not getattr(self.task, "batch_nodes", None))) if not ok]
            if bad:
                raise ValueError(f"model.name {self.model.name!r} is not trained by gradient steps: it runs in one "
                                 f"process on the full graph; got {', '.join(bad)} (use dist.workers 1, "
                                 f"dist.deepspeed false, task.batch_nodes null)")
        return self

    @model_validator(mode="after")
    def _mup_fits_model(self) -> RunConfig:
        if self.model.param == "mup":
            if self.task.kind != "image":
                raise ValueError(f"model.param 'mup' is defined for image models only; task.kind is "
                                 f"{self.task.kind!r} (use model.param standard)")
            from etbench.models.registry import get

            et_like = get("image", self.model.name).family in ("et", "ladder")  # draw W^K, W^Q, ξ by model.et.init
            if et_like and self.model.et.init != "width":
                raise ValueError(f"model.param 'mup' with model.name {self.model.name!r} needs model.et.init 'width' "
                                 f"(μP's hidden init std ∝ 1/sqrt(D)); got model.et.init {self.model.et.init!r}")
        return self

    def hash(self) -> str:
        """The run's config hash: of its science, the execution settings (``etbench.hashing.EXECUTION_FIELDS``)
        at their defaults."""
        return science_hash(self.model_dump(mode="json"))

    def execution(self) -> dict[str, Any]:
        """The run's execution settings (:data:`EXECUTION_FIELDS`, dotted key → value): logged, not hashed."""
        flat = self.flat()
        return {key: flat[key] for key in EXECUTION_FIELDS}

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    @property
    def paper_comparable(self) -> bool:
        return self.task.kind == "image" and self.task.dataset == "imagenet" and _matches_paper(self)


def allowed_models(kind: str) -> tuple[str, ...]:
    """The registry's model names for a task kind (imported here, not at the top: the registry loads torch and
    torch_geometric, which a config-only command does not need)."""
    from etbench.models.registry import names

    return names(kind)


def model_differentiable(kind: str, name: str) -> bool:
    """False for a registered model fitted by its own ``fit_step`` (boosted trees) instead of gradient steps."""
    from etbench.models.registry import get

    return get(kind, name).differentiable


def _matches_paper(cfg: RunConfig) -> bool:
    from etbench.models.registry import IMAGE_PRESETS

    return cfg.model.et == IMAGE_PRESETS["imagenet"].et


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively lay ``over`` on ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``d`` with ``a.b.c`` set to ``value`` (creating dicts on the way)."""
    out = copy.deepcopy(d)
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {p!r} is not a mapping")
    node[parts[-1]] = value
    return out


def preset_defaults(overrides: dict[str, Any]) -> dict[str, Any]:
    """The dataset preset's model sizes for the task named in ``overrides`` (empty for graphs)."""
    task = overrides.get("task", {}) or {}
    if task.get("kind") == "graphcls":  # SPEC §5: 4 blocks (model.layers) of one update each
        from etbench.models.graphcls import GRAPHCLS_ET_DEFAULTS

        return {"model": {"et": dict(GRAPHCLS_ET_DEFAULTS), "layers": 4}}
    if task.get("kind", "image") != "image":
        from etbench.models.graph import GAD_ET_DEFAULTS

        return {"model": {"et": dict(GAD_ET_DEFAULTS)}}
    from etbench.models.registry import IMAGE_PRESETS

    ds = task.get("dataset", "digits")
    preset = IMAGE_PRESETS.get(ds)
    if preset is None:
        return {}
    return {"task": {"patch": preset.patch}, "model": {"et": preset.et.model_dump()}}


class ConfigError(EtbenchError, ValueError):
    """A run config is invalid; the message names the key path(s) and what is allowed."""


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("image", "graph", "graphcls")))
        lines.append(f"  {loc or '<root>'}: {e['msg']}")
    return "\n".join(lines)


def resolve_run_config(overrides: dict[str, Any], source: str = "config") -> RunConfig:
    """Preset + defaults + overrides → validated RunConfig (raises ConfigError naming the bad keys)."""
    task = dict(overrides.get("task") or {})
    task.setdefault("kind", "image")
    overrides = {**overrides, "task": task}
    merged = deep_merge(preset_defaults(overrides), overrides)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
