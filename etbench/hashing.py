"""Stable identity of a resolved config: the same config gives the same hash on every machine.

:func:`config_hash` hashes whatever it is given. A run's identity is :func:`science_hash` of its config's dump
(``RunConfig.hash``): the execution settings (:data:`EXECUTION_FIELDS`) at their defaults. They live here, in the
module every room may import, because the report (analysis) and the store migration (tracking) need the list too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Execution settings (dotted key → default, as ``RunConfig.model_dump(mode="json")`` writes it): how a run is
#: carried out, not what it computes. The hash sees each at its default, so changing one mid-grid neither re-trains
#: the grid nor splits a cell into two seeds' worth of runs; the real values are still logged (params, config.json).
#: Chosen field by field (docs/run_identity.md):
#:
#: - ``train.checkpoint_every``: when state is saved, never what a step computes (saving draws no random numbers;
#:   Tune still hears every epoch, etbench.engine.tune_bridge).
#: - ``dist.cpus_per_worker``: the CPUs Ray reserves per worker (and a one-worker trial's torch threads): placement
#:   and speed. A CPU run's float sums may round differently with another thread count, at the level of GPU
#:   run-to-run noise; ``cost/throughput`` and ``cost/wall_s`` differ, so read those beside ``params.dist.*``.
#: - ``dist.max_failures``: how often Ray Train restarts a failed worker group; a restart resumes the checkpoint.
#:
#: Kept in the hash on purpose: ``dist.activation_checkpointing`` (the recomputed descent step agrees with the stored
#: one to ~1e-6, not bit for bit: tests/test_distributed.py; peak memory, a reported metric, changes),
#: ``dist.offload`` (DeepSpeed's CPU Adam updates the fp32 master weights in another kernel: not the GPU
#: optimizer's numbers), ``dist.workers`` / ``grad_accum`` / ``zero_stage`` / ``deepspeed`` / ``use_gpu`` and
#: ``train.device`` / ``bf16`` (batch split, reduction order, precision, placement), ``train.eval_trace_samples``
#: (what the energy trace averages over), ``task.root`` / ``task.path`` (they name the data; another copy may be
#: other data). Storage and retention are no part of a RunConfig (``checkpoints:`` is the grid's).
#: tests/test_science_hash.py checks these defaults against the config classes'.
EXECUTION_DEFAULTS: dict[str, Any] = {"train.checkpoint_every": 1, "dist.cpus_per_worker": 1.0,
                                      "dist.max_failures": 2}
EXECUTION_FIELDS: tuple[str, ...] = tuple(EXECUTION_DEFAULTS)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; floats written by repr so 0.1 stays 0.1."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any, length: int = 12) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (a dict or anything with ``model_dump``)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def science_dump(dump: dict[str, Any]) -> dict[str, Any]:
    """A copy of a RunConfig dump with every execution field reset to its default (a field absent stays absent).

    Reset, not removed: the dump of a config at default execution settings is byte for byte the one hashed before
    the execution settings left the hash, so every run, plan and document hashed then at those defaults keeps its
    hash."""
    out = dict(dump)
    for key, default in EXECUTION_DEFAULTS.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name in out[section]:
            out[section] = {**out[section], name: default}  # copies only the sections it changes
    return out


def science_hash(dump: dict[str, Any], length: int = 12) -> str:
    """The config hash of a RunConfig dump (``model_dump(mode="json")``): of its science alone."""
    return config_hash(science_dump(dump), length)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
