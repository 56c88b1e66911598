"""The tuning stage of a grid: per-model search spaces, one equal budget, a search algorithm and ASHA.

A grid with a ``tuning:`` section runs in two stages (executed by :mod:`etbench.sweep.tune_stage`):

1. **tune** — for every model and every combination of the grid's axes (a *group*), Ray Tune draws
   ``budget.configurations`` configurations from that model's search space (random search, or Optuna's TPE), each
   trained for ``budget.epochs`` epochs at the tuning seed (and the grid's first split). Trials report the
   validation metric every epoch, so ASHA can stop poor ones early. Selection uses the validation metric only.
2. **final** — each group's configuration with the best validation metric (read back from MLflow) is re-run over
   the grid's ``seeds`` (× ``splits``). Comparisons use only these runs; the tuning seed must not be one of them.

Every model gets the same budget (configurations and epochs) unless ``allow_unequal_budget: true``, and ASHA's
``grace_period`` must exceed the largest ``train.warmup_epochs`` any trial can get (no configuration is judged
before its warm-up ends). Selection ties go to the earliest run, then the smallest run id. This module
holds the schema, its validation (errors name the file and key), the plan and the selection rule; it imports no
Ray at load time.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from etbench.config import ConfigError, RunConfig, resolve_run_config, set_dotted
from etbench.hashing import canonical_json, config_hash

# keys a search space may not touch: they define the stage, the model or the task, not a hyper-parameter
RESERVED = ("train.seed", "train.epochs", "model.name", "task.", "dist.")
DEFAULT_METRIC = {"image": ("val/mse_masked", "min"), "graph": ("val/macro_f1", "max"), "graphcls": ("val/acc", "max")}


class SearchDim(BaseModel):
    """One hyper-parameter's distribution; ``randint`` includes ``high``; a plain list in YAML means ``choice``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: Literal["uniform", "loguniform", "choice", "randint"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def check(self) -> None:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("a 'choice' dimension needs a non-empty 'values' list")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.distribution!r} dimension needs low < high, got low={self.low}, "
                             f"high={self.high}")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError("a 'loguniform' dimension needs low > 0")

    def sample(self, rng: random.Random) -> Any:
        """One draw (validation and tests; the real draws come from Ray Tune's searcher)."""
        if self.distribution == "choice":
            return rng.choice(self.values or [])
        lo, hi = float(self.low or 0), float(self.high or 0)
        if self.distribution == "uniform":
            return rng.uniform(lo, hi)
        if self.distribution == "randint":
            return rng.randint(int(lo), int(hi))
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.randint``'s upper bound is exclusive, hence + 1)."""
        from ray import tune

        if self.distribution == "choice":
            return tune.choice(list(self.values or []))
        lo, hi = float(self.low or 0), float(self.high or 0)
        if self.distribution == "uniform":
            return tune.uniform(lo, hi)
        if self.distribution == "randint":
            return tune.randint(int(lo), int(hi) + 1)
        return tune.loguniform(lo, hi)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    configurations: int = Field(ge=1, description="configurations tried per model (and per axis combination)")
    epochs: int = Field(ge=1, description="epochs of each tuning trial (ASHA's max_t)")


class ModelTuning(BaseModel):
    """One model's search space (dotted config keys) and, with ``allow_unequal_budget``, its own budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: dict[str, SearchDim | list[Any]]
    budget: Budget | None = None

    @field_validator("space")
    @classmethod
    def _dims(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("a search space needs at least one key")
        for k, d in v.items():
            if isinstance(d, list) and not d:
                raise ValueError(f"{k}: an empty list of values")
            if isinstance(d, SearchDim):
                try:
                    d.check()
                except ValueError as e:
                    raise ValueError(f"{k}: {e}") from None
        return v

    def dims(self) -> dict[str, SearchDim]:
        return {k: d if isinstance(d, SearchDim) else SearchDim(distribution="choice", values=d)
                for k, d in self.space.items()}


class Scheduler(BaseModel):
    """Early stopping of tuning trials: ASHA on the validation metric, by epoch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TuningSpec(BaseModel):
    """The ``tuning:`` section of a grid file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["random", "optuna"] = "random"
    search_seed: int = Field(0, description="seeds the searcher (the same seed draws the same configurations)")
    seed: int = Field(1000, description="training seed of the tuning trials; must not be a final-stage seed")
    metric: str | None = Field(None, description="validation metric (default: the task's, val/mse_masked or "
                                                 "val/macro_f1 / val/auroc)")
    mode: Literal["min", "max"] | None = None
    budget: Budget
    allow_unequal_budget: bool = False
    scheduler: Scheduler = Field(default_factory=Scheduler)
    models: dict[str, ModelTuning]
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: the grid's")
    final_epochs: int | None = Field(None, ge=1, description="epochs of the final runs (default: budget.epochs)")
    split: int | None = Field(None, ge=0, description="the split (graph tasks) or outer fold (graphcls) the search "
                                                      "runs on; default: the grid's first split. Outside the "
                                                      "grid's splits, no final run is scored on data the "
                                                      "search selected on")
    space_ratio: float = Field(2.0, ge=1, description="the plan warns when two models searched at the same axis "
                                                      "values differ by more than this factor in free dimensions "
                                                      "or in discrete combinations (spaces of unequal effect)")

    def budget_of(self, model: str) -> Budget:
        m = self.models.get(model)
        return m.budget if m is not None and m.budget is not None else self.budget


@dataclass(frozen=True)
class Group:
    """One search: a model at one combination of the grid's axes."""

    model: str
    axes: dict[str, Any]
    gid: str  # stable id: model + hash of the axis values (folder and MLflow tag)
    kind: str  # a task kind: "image" | "graph" | "graphcls"
    split: int | None
    metric: str
    mode: str
    budget: Budget
    dims: dict[str, SearchDim] = field(default_factory=dict)


def _source_error(source: str, key: str, msg: str) -> ValueError:
    from etbench.sweep.grid import GridError

    return GridError(f"{source}: {key}: {msg}")


def metric_key(metric: str) -> str:
    """Tune's name of a metric (Tune flattens nested results on '/'): ``val/mse_masked`` → ``val_mse_masked``."""
    return metric.replace("/", "_")


def groups(spec: Any, source: str = "grid") -> list[Group]:
    """The searches of a tuned grid (one per model × axis combination), validated."""
    from etbench.sweep.grid import model_combos

    t: TuningSpec = spec.tuning
    if t.split is not None and not spec.splits:
        raise _source_error(source, "tuning.split", f"{t.split} set, but the grid has no splits (only grids with a "
                                                    "'splits:' list search on one split)")
    split = t.split if t.split is not None else (spec.splits or [None])[0]
    out = []
    for model, applied in model_combos(spec):
        probe = _probe(spec, model, applied, source)
        kind = probe.task.kind
        metric, mode = t.metric, t.mode
        if metric is None:
            metric, mode = DEFAULT_METRIC[kind]
            if kind == "graph" and probe.task.protocol == "gadbench":  # type: ignore[union-attr]
                metric = "val/auroc"
        mode = mode or ("min" if "mse" in metric or metric.endswith("loss") else "max")
        tag = model if not applied else f"{model}-{config_hash(applied, 8)}"
        out.append(Group(model, applied, tag, kind, split, metric, mode, t.budget_of(model),
                         t.models[model].dims() if model in t.models else {}))
    return out


def group_overrides(spec: Any, g: Group, seed: int, epochs: int, split: int | None) -> dict[str, Any]:
    """The override dict of group ``g`` at one seed/split and epoch count, before any searched value is set."""
    from etbench.sweep.grid import trial_overrides

    return set_dotted(trial_overrides(spec, g.model, g.axes, seed, split), "train.epochs", epochs)


def config_from(over: dict[str, Any], params: dict[str, Any], source: str = "grid") -> RunConfig:
    """``over`` with the searched ``params`` (dotted keys) set, resolved and validated."""
    from etbench.sweep.grid import GridError

    for k, v in params.items():
        over = set_dotted(over, k, v)
    try:
        return resolve_run_config(over, source=f"{source} (tuning, {params})")
    except ConfigError as e:
        raise GridError(str(e)) from None


def _probe(spec: Any, model: str, applied: dict[str, Any], source: str) -> RunConfig:
    from etbench.sweep.grid import GridError, trial_overrides

    try:
        return resolve_run_config(trial_overrides(spec, model, applied, spec.tuning.seed, (spec.splits or [None])[0]),
                                  source=f"{source} (tuning, model={model}, {applied})")
    except ConfigError as e:
        raise GridError(str(e)) from None


def tuning_overrides(spec: Any, g: Group) -> dict[str, Any]:
    return group_overrides(spec, g, spec.tuning.seed, g.budget.epochs, g.split)


def tuning_config(spec: Any, g: Group, params: dict[str, Any], source: str = "grid") -> RunConfig:
    """The resolved config of one tuning trial: the group's config + sampled ``params``, tuning seed, budget epochs."""
    return config_from(tuning_overrides(spec, g), params, source)


def final_configs(spec: Any, g: Group, params: dict[str, Any],
                  source: str = "grid") -> list[tuple[int, int | None, RunConfig]]:
    """(seed, split, config) of the final runs of group ``g`` at the selected ``params``."""
    epochs = spec.tuning.final_epochs or g.budget.epochs
    splits: list[int | None] = list(spec.splits) if spec.splits is not None else [None]
    return [(s, sp, config_from(group_overrides(spec, g, s, epochs, sp), params, source))
            for s in spec.seeds for sp in splits]


def validate(spec: Any, source: str = "grid") -> list[Group]:
    """Everything that can be checked before anything runs; errors name the file and the key path."""
    from etbench.sweep.grid import _is_et_only

    t: TuningSpec = spec.tuning
    for m in t.models:
        if m not in spec.models:
            raise _source_error(source, f"tuning.models.{m}", f"{m!r} is not one of the grid's models "
                                                               f"({', '.join(spec.models)})")
    for m in spec.models:
        if m not in t.models:
            raise _source_error(source, "tuning.models", f"model {m!r} has no search space; every compared model "
                                                         f"needs one (an equal search for every model)")
    budgets = {m: t.budget_of(m) for m in spec.models}
    if len({(b.configurations, b.epochs) for b in budgets.values()}) > 1 and not t.allow_unequal_budget:
        odd = [m for m, b in budgets.items() if b != t.budget]
        raise _source_error(source, f"tuning.models.{odd[0]}.budget",
                            f"budgets differ between models ({', '.join(f'{m}: {b.configurations} × {b.epochs} epochs' for m, b in budgets.items())}); "  # noqa: E501
                            f"set tuning.allow_unequal_budget: true to compare them anyway")
    if t.seed in spec.seeds:
        raise _source_error(source, "tuning.seed", f"{t.seed} is also a final-stage seed (seeds: {spec.seeds}); the "
                                                   f"final runs must be fresh seeds, not the run that was selected")
    if t.metric is not None and not t.metric.startswith("val/"):
        raise _source_error(source, "tuning.metric", f"{t.metric!r}: selection uses validation metrics only "
                                                     f"(val/...)")
    for m, b in budgets.items():
        if t.scheduler.kind == "asha" and t.scheduler.grace_period > b.epochs:
            raise _source_error(source, "tuning.scheduler.grace_period", f"{t.scheduler.grace_period} > the "
                                                                         f"{b.epochs} epochs of {m}'s budget")
    out = groups(spec, source)
    for g in out:
        for key, dim in g.dims.items():
            where = f"tuning.models.{g.model}.space.{key}"
            if key.startswith(RESERVED) or key in RESERVED:
                raise _source_error(source, where, "not a tunable hyper-parameter (the stage sets seeds, epochs, "
                                                   "model, task and resources)")
            if g.model != "et" and _is_et_only(key, g.kind):
                raise _source_error(source, where, f"{g.model} has no such hyper-parameter (an ET-only key)")
            ends = [dim.low, dim.high] if dim.distribution != "randint" else [int(dim.low or 0), int(dim.high or 0)]
            for value in (list(dim.values or []) if dim.distribution == "choice" else ends):
                try:
                    tuning_config(spec, g, {key: value}, source)
                except ValueError as e:
                    raise _source_error(source, where, str(e).replace("\n", " ")) from None
    if t.scheduler.kind == "asha":
        for g in out:
            _check_grace(spec, g, source)
    return out


def largest_warmup(spec: Any, g: Group, source: str = "grid") -> tuple[float, str]:
    """The largest ``train.warmup_epochs`` a tuning trial of ``g`` can get, and the grid key it comes from."""
    key = "train.warmup_epochs"
    dim = g.dims.get(key)
    if dim is not None:  # the search sets it in every trial: its largest value counts, not the base's
        if dim.distribution == "choice":
            top = max(float(v) for v in dim.values or [])
        else:  # randint draws integers up to int(high)
            top = float(int(dim.high or 0) if dim.distribution == "randint" else dim.high or 0)
        return top, f"tuning.models.{g.model}.space.{key}"
    value = float(tuning_config(spec, g, {}, source).train.warmup_epochs)
    if key in g.axes:
        return value, f"axes.{key}"
    if "warmup_epochs" in (spec.base.get("train") or {}):
        return value, f"base.{key}"
    return value, f"the default {key}"


def _check_grace(spec: Any, g: Group, source: str) -> None:
    """ASHA's first rung must come after every warm-up ends, else it judges configurations mid-warm-up."""
    grace = spec.tuning.scheduler.grace_period
    warm, where = largest_warmup(spec, g, source)
    if grace <= warm:
        axes = "".join(f", {k}={v}" for k, v in g.axes.items())
        raise _source_error(source, "tuning.scheduler.grace_period",
                            f"{grace} is not above the warm-up of {g.model}{axes}: train.warmup_epochs = {warm:g} "
                            f"({where}); ASHA's first rung would judge configurations before their learning rate has "
                            f"finished warming up. Allowed: grace_period > {warm:g} (at least {math.floor(warm) + 1}), "
                            f"or lower the warm-up")


def select_best(runs: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The run with the best finite ``value``; ``None`` when no run has one.

    Deterministic, and the same on a re-run of the search: ties on the value go to the configuration whose
    searched ``params`` come first as canonical JSON (sorted keys; the same draws give the same pick however the
    trials were scheduled), then to the earliest ``start`` (missing: 0), then the smallest ``run_id``
    (lexicographic), whatever the order of ``runs``. The stated rule is :data:`TIE_BREAK`.
    """
    ok = [r for r in runs if isinstance(r.get("value"), int | float) and math.isfinite(r["value"])]
    if not ok:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(ok, key=lambda r: (sign * float(r["value"]), canonical_json(r.get("params") or {}),
                                  r.get("start") or 0, str(r.get("run_id", ""))))


#: The selection's tie-break, as the plan and the tuned report state it.
TIE_BREAK = ("ties on the validation value go to the searched values first in canonical JSON order, then the "
             "earliest run, then the smallest run id")


def stopped_at(history: list[dict[str, Any]], budget_epochs: int) -> int | None:
    """The epoch a scheduler's stop cut a tuning run short at, or ``None`` when the run reached its budget.

    Decided from the run's recorded epoch history (``metrics.json``), never from when the stop arrived: a stop
    reaches a distributed (Ray Train) trial asynchronously, so its ranks may finish the last epoch first — such a run
    is a full run and is not tagged ``etbench.stopped_early``.
    """
    done = len(history)
    return done if done < budget_epochs else None


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def space_json(dims: dict[str, SearchDim]) -> str:
    """A search space as the ``etbench.tune.space`` tag: dotted key → its distribution, bounds and values (read
    back by :mod:`etbench.analysis.tuning_edges` to flag selected values at a range's edge)."""
    return json.dumps({k: d.model_dump(mode="json", exclude_none=True) for k, d in dims.items()}, sort_keys=True,
                      default=str)


def group_seed(search_seed: int, gid: str) -> int:
    """The searcher seed of one group: the grid's search seed mixed with the group id (stable across machines)."""
    return int(hashlib.sha256(f"{search_seed}:{gid}".encode()).hexdigest()[:8], 16)


def space_size(dims: dict[str, SearchDim]) -> tuple[int, int | None]:
    """(free dimensions, discrete combinations) of a search space: a dimension is free when it can take more
    than one value; the combinations are the product of the discrete dimensions' value counts (``None`` when a
    continuous dimension makes them unbounded)."""
    free, combos = 0, 1
    for d in dims.values():
        if d.distribution in ("uniform", "loguniform"):
            free, combos = free + 1, None
            continue
        if d.distribution == "choice":
            count = len({repr(v) for v in d.values or []})
        else:  # randint: both bounds included
            count = int(d.high or 0) - int(d.low or 0) + 1
        free += count > 1
        combos = None if combos is None else combos * count
    return free, combos


def space_warnings(gs: list[Group], ratio: float) -> list[str]:
    """Searches at the same axis values whose spaces differ by more than ``ratio`` in free dimensions or (both
    discrete) in combinations: a budget of equal configurations is then not a search of equal effect."""
    out = []
    by_axes: dict[str, list[Group]] = {}
    for g in gs:
        by_axes.setdefault(config_hash(g.axes, 8), []).append(g)
    for block in by_axes.values():
        sizes = {g.model: space_size(g.dims) for g in block}
        free = {m: f for m, (f, _) in sizes.items()}
        lo, hi = min(free, key=lambda m: free[m]), max(free, key=lambda m: free[m])
        if free[hi] > ratio * free[lo]:
            out.append(f"WARNING: search spaces of unequal effect{_at(block[0].axes)}: {hi} searches {free[hi]} free "
                       f"dimension(s), {lo} {free[lo]} (more than tuning.space_ratio = {ratio:g} apart)")
        combos = {m: c for m, (_, c) in sizes.items() if c is not None}
        if len(combos) == len(sizes) >= 2:
            lo, hi = min(combos, key=lambda m: combos[m]), max(combos, key=lambda m: combos[m])
            if combos[hi] > ratio * combos[lo]:
                out.append(f"WARNING: search spaces of unequal effect{_at(block[0].axes)}: {hi} has {combos[hi]} "
                           f"discrete combinations, {lo} {combos[lo]} (more than tuning.space_ratio = {ratio:g} "
                           f"apart)")
    return out


def _at(axes: dict[str, Any]) -> str:
    return f" at {' '.join(f'{k}={v}' for k, v in axes.items())}" if axes else ""


def plan_lines(spec: Any, source: str = "grid") -> list[str]:
    """What ``etbench sweep plan`` prints for a tuned grid: both stages, the budget per model, the cost."""
    from etbench.sweep.grid import EFFECTIVE_FLOPS, Trial, estimate_cost

    t: TuningSpec = spec.tuning
    gs = groups(spec, source)
    lines = [f"grid {spec.name}: tuned — stage 1 tune ({t.algorithm} search, seed {t.search_seed}, scheduler "
             f"{t.scheduler.kind}, training seed {t.seed}), stage 2 final ({len(spec.seeds)} seeds"
             + (f" × {len(spec.splits)} splits" if spec.splits else "") + f"); {len(gs)} searches; max "
             f"{t.max_concurrent_trials or spec.max_concurrent_trials} concurrent"]
    margins = spec.analysis.equivalence_margins
    lines.append(f"resources per trial {spec.resources.model_dump()}; checkpoints kept {spec.checkpoints.model_dump()}"
                 + (f"; equivalence margins (TOST in the report) {dict(sorted(margins.items()))}" if margins else ""))
    if gs and gs[0].split is not None:
        inside = gs[0].split in (spec.splits or [])
        lines.append(f"search on split {gs[0].split}" + (
            " — also a final split: the final runs on it are scored on a split the search selected on (set "
            "tuning.split outside the grid's splits)" if inside else " (outside the final splits)"))
    lines.append(f"selection: best validation value; {TIE_BREAK}")
    tot = {"tune": 0.0, "final": 0.0}
    hours = {"tune": 0.0, "final": 0.0}
    rng = random.Random(0)
    for g in gs:
        cfg = tuning_config(spec, g, {k: d.sample(rng) for k, d in g.dims.items()}, source)
        finals = final_configs(spec, g, {k: d.sample(rng) for k, d in g.dims.items()}, source)
        for stage, cfgs in (("tune", [cfg] * g.budget.configurations), ("final", [c for _, _, c in finals])):
            for c in cfgs:
                cost = estimate_cost(Trial(config=c, config_hash=c.hash(), model=g.model, seed=c.train.seed,
                                           split=None, axes=g.axes))
                if cost["train_pflop"] == cost["train_pflop"]:
                    tot[stage] += cost["train_pflop"]
                    hours[stage] += cost["train_pflop"] * 1e15 / EFFECTIVE_FLOPS[c.task.kind]["cpu"] / 3600
        axes = " ".join(f"{k}={v}" for k, v in g.axes.items())
        space = ", ".join(f"{k} {d.distribution}" + (f" {d.values}" if d.values else f" [{d.low:g}, {d.high:g}]")
                          for k, d in g.dims.items())
        free, combos = space_size(g.dims)
        lines.append(f"  {g.gid:18s} {g.model:9s} {axes}  budget {g.budget.configurations} configurations × "
                     f"{g.budget.epochs} epochs on {g.metric} ({g.mode}); final {len(finals)} runs × "
                     f"{t.final_epochs or g.budget.epochs} epochs; space: {space} ({free} free dimension(s), "
                     + (f"{combos} discrete combinations)" if combos is not None else "continuous)"))
    lines += space_warnings(gs, t.space_ratio)
    lines.append(f"estimated training compute: tune ≤ {tot['tune'] * 1e3:.2f} TFLOP ≈ {hours['tune']:.2f} CPU-trial-"
                 f"hours (before ASHA's savings), final {tot['final'] * 1e3:.2f} TFLOP ≈ {hours['final']:.2f} "
                 f"CPU-trial-hours; nothing was created")
    return lines
