"""Migrate a store's config hashes to the science hash (``etbench tracking rehash``; docs/run_identity.md).

Since ``etbench.hashing.EXECUTION_FIELDS`` (retries, CPUs per worker, checkpoint cadence) left the config hash, a
run that used a non-default execution setting carries a hash that today's code no longer plans: a sweep would
re-train it and the sweep's dedup would not see it. :func:`rehash` recomputes each run's hash from the config it
logged (its params, else its ``config.json`` artifact) and re-tags the runs whose stored ``etbench.config_hash``
differs, keeping the old value in ``etbench.config_hash_v1``. Narrow on purpose: it only resets the execution
fields; a logged config must first reproduce the stored hash, so a run hashed under another schema version is
reported, never re-tagged. Runs at default execution settings are settled from their params alone.

Trial folders are not touched: a FINISHED run's folder under the old hash is no longer needed (the run is in MLflow
and the next sweep skips its config); an unfinished run under the old hash re-trains under the new one, and the
sweep closes the old run KILLED as a second live run of its hash.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etbench.errors import EtbenchError
from etbench.hashing import EXECUTION_DEFAULTS, config_hash, science_hash
from etbench.tracking import schema as S

TAG_CONFIG_HASH_V1 = S.TAG_CONFIG_HASH_V1
PAGE_SIZE = 1000


class RehashError(EtbenchError, ValueError):
    """The store or experiment to migrate is not there."""


@dataclass(frozen=True)
class Change:
    """One run whose stored hash differs from its science hash."""

    run_id: str
    experiment: str
    status: str
    old: str
    new: str
    execution: dict[str, Any]  # the run's non-default execution settings (dotted key → value)


@dataclass
class RehashResult:
    """What :func:`rehash` found: the runs re-tagged (or that would be, dry run), those left as they are, those it
    could not settle (run id, reason)."""

    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False


def parse_param(value: str) -> Any:
    """A logged param string → the JSON value it was written from (``str(v)`` of a scalar, JSON of a list)."""
    named = {"True": True, "False": False, "None": None}
    if value in named:
        return named[value]
    try:
        return json.loads(value)
    except ValueError:
        return value


def _at_default(params: dict[str, str]) -> bool | None:
    """True when every execution field's param shows its default; None when one is missing (no params logged)."""
    for key, default in EXECUTION_DEFAULTS.items():
        if key not in params:
            return None
        if parse_param(params[key]) != default:
            return False
    return True


def _unflatten(params: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parse_param(value)
    return out


def _artifact_config(client: Any, run_id: str) -> dict[str, Any] | None:
    """The ``config`` of the run's config.json artifact, or None when it has none (a run that ended early)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.json", tmp)
        except Exception:  # no such artifact (MLflow raises several kinds)
            return None
        data = json.loads(Path(path).read_text())
    config = data.get("config") if isinstance(data, dict) else None
    return config if isinstance(config, dict) else None


def _params_config(params: dict[str, str]) -> dict[str, Any] | None:
    """The run's config dump rebuilt from its params (each value parsed back to its JSON type), or None. Not
    validated: :func:`settle` trusts it only when it reproduces the run's stored hash."""
    if not params:
        return None
    try:
        return _unflatten(params)
    except (AttributeError, TypeError):  # a key both a value and a section: not a flattened dump
        return None


def settle(client: Any, run_id: str, stored: str, params: dict[str, str]) -> tuple[str | None, str]:
    """(the run's science hash, how it was found) — None with the reason when it cannot be told.

    A logged config is trusted only when it reproduces ``stored`` under the old rule (whole dump) or already under
    the new one (science dump): anything else was hashed by another version of the config schema."""
    reasons = []
    for source, get in (("params", lambda: _params_config(params)),  # no artifact I/O: tried first
                        ("config.json", lambda: _artifact_config(client, run_id))):
        dump = get()
        if dump is None:
            reasons.append(f"no usable {source}")
            continue
        new = science_hash(dump)
        if stored in (config_hash(dump), new):
            return new, source
        reasons.append(f"its {source} hashes to {config_hash(dump)}, not to the stored {stored}")
    return None, "; ".join(reasons)


def _experiments(client: Any, experiment: str | None) -> list[tuple[str, str]]:
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise RehashError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}; existing: "
                              f"{names}")
        return [(exp.experiment_id, exp.name)]
    return [(e.experiment_id, e.name) for e in client.search_experiments()]


def _runs(client: Any, exp_id: str) -> Iterator[Any]:
    from mlflow.entities import ViewType

    token: str | None = None
    while True:
        page = client.search_runs([exp_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def rehash(tracking_uri: str, experiment: str | None = None, *, dry_run: bool = False, client: Any = None,
           echo: Callable[[str], None] | None = None) -> RehashResult:
    """Re-tag every run of ``experiment`` (None: every experiment) whose stored config hash is not its science
    hash; ``dry_run`` only reports. ``echo`` gets one line per change (and per run it cannot settle)."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient(tracking_uri)
    defaults = EXECUTION_DEFAULTS
    result = RehashResult(dry_run=dry_run)
    for exp_id, name in _experiments(client, experiment):
        for run in _runs(client, exp_id):
            tags, params = run.data.tags, run.data.params
            stored = tags.get(S.TAG_CONFIG_HASH)
            if stored is None or tags.get(S.TAG_KIND) == S.KIND_GRID:  # not a trial run (a grid's parent run)
                continue
            if _at_default(params) is True:  # science dump = whole dump: the hash is the same under both rules
                result.unchanged += 1
                continue
            new, how = settle(client, run.info.run_id, stored, params)
            if new is None:
                result.skipped.append((run.info.run_id, how))
                if echo:
                    echo(f"  skipped {name} {run.info.run_id}: {how}")
                continue
            if new == stored:
                result.unchanged += 1
                continue
            knobs = {k: parse_param(params[k]) for k in defaults if k in params
                     and parse_param(params[k]) != defaults[k]}
            change = Change(run.info.run_id, name, run.info.status, stored, new, knobs)
            result.changed.append(change)
            if not dry_run:
                if TAG_CONFIG_HASH_V1 not in tags:
                    client.set_tag(change.run_id, TAG_CONFIG_HASH_V1, stored)
                client.set_tag(change.run_id, S.TAG_CONFIG_HASH, new)
            if echo:
                shown = ", ".join(f"{k} {v}" for k, v in knobs.items())
                echo(f"  {'would re-tag' if dry_run else 're-tagged'} {name} {change.run_id} ({change.status}): "
                     f"{stored} -> {new} ({shown or 'from ' + how})")
    return result
