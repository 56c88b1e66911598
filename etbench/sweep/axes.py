"""The grid language beyond a Cartesian product: per-model axes, ``zip:`` groups and ``derived:`` values.

A grid's trials are the product of its *dimensions*: every entry of ``axes`` is one (a list of values, a random-search
spec, or ``{values: [...], models: [...]}`` for an axis that only the named models get), and every ``zip:`` group is
one (several keys whose i-th values go together; equal lengths). A model that an axis does not name — or a baseline,
for an ET-only key — does not take that axis, so its duplicate combinations collapse into one trial. ``derived:``
values are computed per trial, after the axes, from the resolved config (``model.et.memories: 4 * model.et.dim``)
with the restricted arithmetic of :mod:`etbench.sweep.expr`. A grid that uses none of this expands exactly as before.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from etbench.config import ConfigError, resolve_run_config, set_dotted
from etbench.hashing import flatten
from etbench.sweep.expr import ExprError, evaluate, names

# ET hyper-parameters that an image baseline does not have (ViTs reuse dim, heads and steps-as-depth).
ET_ONLY_KEYS = ("memories", "mem_ratio", "alpha", "self_attention", "hn_kind", "terms", "grad_mode", "eps",
                "hn_beta_init", "attn_init_std", "mem_init_std", "init")

Models = Annotated[list[str] | None, Field(None, min_length=1, description=(
    "only these models take the axis; the grid's other models get one trial for it"))]


class RandomAxis(BaseModel):
    """A random-search axis: ``samples`` draws from a distribution, fixed by the grid's ``search_seed``."""

    model_config = ConfigDict(extra="forbid")

    distribution: Literal["uniform", "loguniform", "choice", "randint"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    samples: int = Field(ge=1)
    models: Models

    def draw(self, rng: random.Random) -> list[Any]:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("a 'choice' axis needs a non-empty 'values' list")
            return [rng.choice(self.values) for _ in range(self.samples)]
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.distribution!r} axis needs low < high, got low={self.low}, high={self.high}")
        if self.distribution == "uniform":
            return [rng.uniform(self.low, self.high) for _ in range(self.samples)]
        if self.distribution == "randint":
            return [rng.randint(int(self.low), int(self.high)) for _ in range(self.samples)]
        if self.low <= 0:
            raise ValueError("a 'loguniform' axis needs low > 0")
        return [math.exp(rng.uniform(math.log(self.low), math.log(self.high))) for _ in range(self.samples)]


class ValuesAxis(BaseModel):
    """A listed axis with options: ``{values: [...], models: [vit]}``."""

    model_config = ConfigDict(extra="forbid")

    values: list[Any] = Field(min_length=1)
    models: Models


AXIS_FORMS = ("<list>", "<values>", "<random>")  # the tags of AxisSpec's union; error_path drops them


def _axis_kind(v: Any) -> str | None:
    if isinstance(v, list):
        return AXIS_FORMS[0]
    if isinstance(v, dict | ValuesAxis | RandomAxis):
        return AXIS_FORMS[2] if isinstance(v, RandomAxis) or (isinstance(v, dict) and "distribution" in v) \
            else AXIS_FORMS[1]
    return None


def error_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A validation error's key path in the grid file: ``axes.<key>.<form tag>.x`` → ``axes.<key>.x``."""
    return tuple(p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "axes" and p in AXIS_FORMS))


AxisSpec = Annotated[
    Annotated[list[Any], Tag(AXIS_FORMS[0])] | Annotated[ValuesAxis, Tag(AXIS_FORMS[1])]
    | Annotated[RandomAxis, Tag(AXIS_FORMS[2])],
    Discriminator(_axis_kind, custom_error_type="axis_form", custom_error_message=(
        "an axis is a list of values, {values: [...], models: [...]}, or a random-search spec {distribution: ...}")),
]


class ZipGroup(BaseModel):
    """Axes that move together: the i-th values of every key form one point (``models:`` restricts the group)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, list[Any]] = Field(init=False)

    models: Models

    @model_validator(mode="after")
    def _equal_lengths(self) -> ZipGroup:
        lists = self.lists()
        if not lists:
            raise ValueError("a zip group needs at least one axis (dotted config key: list of values)")
        lengths = {k: len(v) for k, v in lists.items()}
        if 0 in lengths.values():
            raise ValueError(f"axis {next(k for k, n in lengths.items() if not n)!r} has no values")
        if len(set(lengths.values())) > 1:
            raise ValueError("the axes of a zip group move together and need equal lengths, got "
                             + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
        return self

    def lists(self) -> dict[str, list[Any]]:
        return dict(self.__pydantic_extra__ or {})


class Derived(BaseModel):
    """A value computed per trial: ``expr`` over dotted config keys; ``models:`` restricts it."""

    model_config = ConfigDict(extra="forbid")

    expr: str
    models: Models

    @field_validator("expr", mode="before")
    @classmethod
    def _parses(cls, v: Any) -> str:
        text = str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
        if not isinstance(text, str):
            raise ValueError(f"a derived value is an arithmetic expression string, got {v!r}")
        try:
            names(text)
        except ExprError as e:
            raise ValueError(f"{text!r}: {e}") from None
        return text


def _as_derived(v: Any) -> Any:
    return v if isinstance(v, dict | Derived) else {"expr": v}


DerivedSpec = Annotated[Derived, BeforeValidator(_as_derived)]  # "4 * model.et.dim" or {expr: ..., models: [...]}


@dataclass(frozen=True)
class Dimension:
    """One factor of the product: a single axis (one key) or a zip group (several keys), with its value rows."""

    where: str  # the grid key path for errors: "axes.model.et.steps" or "zip.alpha_T"
    keys: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    models: tuple[str, ...] | None


def is_et_only(key: str, kind: str | None) -> bool:
    """Whether axis ``key`` means nothing to a baseline of task ``kind``: ET-only keys for images (ViTs reuse dim,
    heads and steps as depth); every ``model.et.*`` key for graph tasks (anomaly detection and graph
    classification: the GNN and MLP baselines are sized by ``model.hidden`` / ``model.layers``)."""
    parts = key.split(".")
    if len(parts) != 3 or parts[:2] != ["model", "et"]:
        return False
    return kind in ("graph", "graphcls") or parts[2] in ET_ONLY_KEYS


def _takes(model: str, models: tuple[str, ...] | list[str] | None, key: str, kind: str | None) -> bool:
    return (models is None or model in models) and (model == "et" or not is_et_only(key, kind))


def dimensions(spec: Any, source: str, fail: Callable[[str], Exception]) -> list[Dimension]:
    """The grid's axes then its zip groups, checked: each key once, every named model one of the grid's models.
    Random axes are drawn in file order from ``search_seed`` (as they always were)."""
    rng = random.Random(spec.search_seed)
    dims: list[Dimension] = []
    for key, axis in spec.axes.items():
        if isinstance(axis, RandomAxis):
            try:
                values, models = axis.draw(rng), axis.models
            except ValueError as e:
                raise fail(f"{source}: axes.{key}: {e}") from None
        elif isinstance(axis, ValuesAxis):
            values, models = list(axis.values), axis.models
        else:
            values, models = list(axis), None
        dims.append(Dimension(f"axes.{key}", (key,), [(v,) for v in values], _models(models)))
    for name, group in spec.zip.items():
        lists = group.lists()
        dims.append(Dimension(f"zip.{name}", tuple(lists), list(zip(*lists.values(), strict=True)),
                              _models(group.models)))
    seen: dict[str, str] = {}
    for d in dims:
        for key in d.keys:
            if key in seen:
                raise fail(f"{source}: {d.where}: {key!r} is already swept by {seen[key]}; a key may appear in one "
                           f"axis or zip group only")
            seen[key] = d.where
        _check_models(spec, d.where, d.models, source, fail)
    for key, d in spec.derived.items():
        _check_models(spec, f"derived.{key}", d.models, source, fail)
        if key in seen:
            raise fail(f"{source}: derived.{key}: also swept by {seen[key]}; a key is either an axis or derived")
    _check_derived_order(spec, source, fail)
    return dims


def _models(models: list[str] | None) -> tuple[str, ...] | None:
    return tuple(models) if models is not None else None


def _check_models(spec: Any, where: str, models: tuple[str, ...] | list[str] | None, source: str,
                  fail: Callable[[str], Exception]) -> None:
    for m in models or ():
        if m not in spec.models:
            raise fail(f"{source}: {where}.models: {m!r} is not one of the grid's models ({', '.join(spec.models)})")


def _check_derived_order(spec: Any, source: str, fail: Callable[[str], Exception]) -> None:
    """A derived value may read config keys and the derived values above it, not itself or one below it; in a tuned
    grid it may not read or set a searched key (it is computed before the search draws its values)."""
    keys = list(spec.derived)
    searched: dict[str, str] = {}
    if getattr(spec, "tuning", None) is not None:
        for m, t in spec.tuning.models.items():
            searched.update({k: f"tuning.models.{m}.space.{k}" for k in t.space})
        searched.update({k: f"the tuning stage ({k} is set per stage)" for k in ("train.epochs", "train.seed")})
    for i, (key, d) in enumerate(spec.derived.items()):
        if key in searched:
            raise fail(f"{source}: derived.{key}: also searched by {searched[key]}")
        for n in names(d.expr):
            if n == key or n in keys[i + 1:]:
                raise fail(f"{source}: derived.{key}: {d.expr!r} reads {n!r}, which is derived "
                           f"{'by this entry' if n == key else 'below it'}; a derived value reads config keys and "
                           f"the derived values listed above it")
            if n in searched:
                raise fail(f"{source}: derived.{key}: {d.expr!r} reads {n!r}, searched by {searched[n]}; derived "
                           f"values are computed before the search and cannot follow it")


def combos(spec: Any, source: str, fail: Callable[[str], Exception]) -> list[tuple[str, dict[str, Any]]]:
    """(model, the axis values it takes) for every model × product point, in grid order, duplicates dropped."""
    dims = dimensions(spec, source, fail)
    base_kind = (spec.base.get("task") or {}).get("kind")
    out: list[tuple[str, dict[str, Any]]] = []
    used: set[str] = set()
    for model in spec.models:
        for point in itertools.product(*(d.rows for d in dims)):
            kind = base_kind
            for d, row in zip(dims, point, strict=True):
                kind = dict(zip(d.keys, row, strict=True)).get("task.kind", kind)
            applied: dict[str, Any] = {}
            for d, row in zip(dims, point, strict=True):
                for key, value in zip(d.keys, row, strict=True):
                    if _takes(model, d.models, key, kind):
                        applied[key] = value
                        used.add(d.where)
            if (model, applied) not in out:
                out.append((model, applied))
    for d in dims:
        if d.models is not None and d.where not in used:
            raise fail(f"{source}: {d.where}: applies to none of its models ({', '.join(d.models)}): a baseline "
                       f"does not take ET-only keys ({', '.join(d.keys)})")
    return out


def derive(spec: Any, model: str, over: dict[str, Any], source: str,
           fail: Callable[[str], Exception]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``over`` with the derived values that apply to ``model`` set, and those values (in grid order).

    Each expression reads the trial's resolved config (base, presets and axes applied) with the derived values
    above it already set. A grid without ``derived:`` returns ``over`` untouched."""
    if not spec.derived:
        return over, {}
    kind = (over.get("task") or {}).get("kind", "image")
    todo = [(k, d) for k, d in spec.derived.items() if _takes(model, d.models, k, kind)]
    if not todo:
        return over, {}
    try:
        values = flatten(resolve_run_config(over, source=f"{source} (model={model})").model_dump(mode="json"))
    except ConfigError as e:
        raise fail(str(e)) from None
    out: dict[str, Any] = {}
    for key, d in todo:
        try:
            value = evaluate(d.expr, values)
        except ExprError as e:
            raise fail(f"{source}: derived.{key}: {d.expr!r}: {e} (model {model})") from None
        over = set_dotted(over, key, value)
        values[key] = out[key] = value
    return over, out


def unused_derived(spec: Any, source: str, fail: Callable[[str], Exception], taken: set[str]) -> None:
    """A derived value restricted to models that never take it (baselines and an ET-only key) is an error."""
    for key, d in spec.derived.items():
        if d.models is not None and key not in taken:
            raise fail(f"{source}: derived.{key}: applies to none of its models ({', '.join(d.models)}): a baseline "
                       f"does not take ET-only keys")


def describe(spec: Any) -> list[str]:
    """Lines for ``sweep plan``: how each axis, zip group and derived value is applied (none for a plain product)."""
    if not (spec.zip or spec.derived or any(getattr(a, "models", None) for a in spec.axes.values())):
        return []
    lines: list[str] = []

    def only(models: list[str] | None) -> str:
        return f"  (only {', '.join(models)}; other models: one trial)" if models else ""

    for key, axis in spec.axes.items():
        if isinstance(axis, RandomAxis):
            lines.append(f"  axis {key}: {axis.samples} draws, {axis.distribution}{only(axis.models)}")
        elif isinstance(axis, ValuesAxis):
            lines.append(f"  axis {key}: {list(axis.values)}{only(axis.models)}")
        else:
            lines.append(f"  axis {key}: {list(axis)}")
    for name, group in spec.zip.items():
        lists = group.lists()
        n = len(next(iter(lists.values())))
        lines.append(f"  zip {name} ({n} points, moving together){only(group.models)}:")
        lines += [f"    {k}: {v}" for k, v in lists.items()]
    for key, d in spec.derived.items():
        lines.append(f"  derived {key} = {d.expr}" + (f"  (only {', '.join(d.models)})" if d.models else ""))
    return lines


def trial_values(axes: dict[str, Any], derived: dict[str, Any]) -> str:
    """A trial's axis values then its derived values (``key:=value``), as ``sweep plan`` prints them."""
    return " ".join([f"{k}={v}" for k, v in axes.items()]
                    + [f"{k}:={v:.6g}" if isinstance(v, float) else f"{k}:={v}" for k, v in derived.items()])
