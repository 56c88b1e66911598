"""Admission of runs onto a Ray cluster: queue what the cluster could hold once scaled, refuse what it never can.

A run of ``dist.workers`` workers asks Ray for one bundle per worker (``CPU: cpus_per_worker``, ``GPU: 1`` with
``dist.use_gpu`` — or the grid's ``gpus_per_worker`` share, 1/k of a GPU — plus the grid's custom resources); each
bundle must fit on one node. What the cluster can hold is the union of its alive nodes and of the node types its
autoscaler may launch, read from (first found):

1. a cluster config reported to the GCS (``ray._private.state.state.get_cluster_config()``: node groups with their
   resources and ``max_count``), when the deployment reports one — Ray 2.60's v1 autoscaler, the one tested here,
   does not;
2. an autoscaler YAML (``available_node_types`` with ``resources`` and ``max_workers``): ``$ETBENCH_CLUSTER_CONFIG``,
   else ``~/ray_bootstrap_config.yaml``, which the Ray cluster launcher writes on the head node.

With neither (e.g. KubeRay without ``$ETBENCH_CLUSTER_CONFIG``), only the alive nodes count.

A trial that fits only on a node type with no alive node is admitted: Ray queues it and the autoscaler adds the
node. One that fits no node type, or needs more workers than all node types together can ever hold, is refused
up front with the numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etbench.config import ConfigError

ENV_CLUSTER_CONFIG = "ETBENCH_CLUSTER_CONFIG"
UNLIMITED = 10**6  # an autoscaler max of -1 (no limit)


@dataclass(frozen=True)
class NodeType:
    """Something that can host bundles: an alive node (``max_count`` 1) or an autoscaler node type."""

    name: str
    resources: dict[str, float]
    max_count: int
    alive: bool

    def holds(self, bundle: dict[str, float]) -> int:
        """How many copies of ``bundle`` one node of this type holds."""
        fits = [self.resources.get(k, 0.0) / v for k, v in bundle.items() if v > 0]
        return math.floor(min(fits) + 1e-9) if fits else UNLIMITED

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items())
                        if not k.startswith(("node:", "memory", "object_store_memory")))
        most = "unlimited" if self.max_count >= UNLIMITED else str(self.max_count)
        count = "alive" if self.alive else f"autoscaler max {most}"
        return f"{self.name} {{{res}}} ({count})"


def worker_bundle(cfg: Any, custom: dict[str, float] | None = None, gpus: float = 1.0) -> dict[str, float]:
    """One worker's bundle; ``gpus`` is its GPU share when the run uses a GPU (a grid's
    ``resources.gpus_per_worker``: 1, or 1/k to pack k trials on one GPU)."""
    d = cfg.dist
    return {"CPU": float(d.cpus_per_worker), **({"GPU": float(gpus)} if d.use_gpu else {}), **(custom or {})}


def _gcs_types() -> list[NodeType]:
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS or no autoscaler: nothing reported
        return []
    if config is None:
        return []
    return [NodeType(f"node type {g.name or '?'}", {k: float(v) for k, v in g.resources.items()},
                     UNLIMITED if g.max_count == -1 else int(g.max_count), False)
            for g in config.node_group_configs if g.max_count != 0]


def _yaml_types() -> list[NodeType]:
    import yaml

    path = os.environ.get(ENV_CLUSTER_CONFIG) or str(Path.home() / "ray_bootstrap_config.yaml")
    if not Path(path).is_file():
        if os.environ.get(ENV_CLUSTER_CONFIG):
            raise ConfigError(f"${ENV_CLUSTER_CONFIG}={path}: no such file (an autoscaler cluster YAML)")
        return []
    doc = yaml.safe_load(Path(path).read_text()) or {}
    head = doc.get("head_node_type")
    out = []
    for name, t in (doc.get("available_node_types") or {}).items():
        count = int(t.get("max_workers", doc.get("max_workers", 0)) or 0)
        if name == head or count == 0:
            continue  # the head is alive already
        out.append(NodeType(f"node type {name}", {k: float(v) for k, v in (t.get("resources") or {}).items()},
                            count, False))
    return out


def node_types() -> list[NodeType]:
    """Alive nodes and the node types the autoscaler may add (Ray must be initialised)."""
    import ray

    alive = [NodeType(f"node {n.get('NodeManagerAddress')}", dict(n.get("Resources", {})), 1, True)
             for n in ray.nodes() if n.get("Alive")]
    return alive + (_gcs_types() or _yaml_types())


def check_fits(cfg: Any, types: list[NodeType], custom: dict[str, float] | None = None, gpus: float = 1.0) -> None:
    """Raise ConfigError when no mix of ``types`` can ever hold the run's ``dist.workers`` bundles (each with
    ``gpus`` GPUs when the run uses a GPU: a fraction packs several bundles on one GPU)."""
    bundle = worker_bundle(cfg, custom, gpus)
    need = int(cfg.dist.workers)
    shown = "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
    capacity = sum(t.holds(bundle) * t.max_count for t in types)
    if capacity >= need:
        return
    listing = "; ".join(t.describe() for t in types) or "no nodes"
    what = (f"one worker needs {shown}, which no node or node type has" if capacity == 0 else
            f"{need} workers × {shown} need {need} such slots; the cluster can hold at most {capacity} once scaled")
    share = f", gpus_per_worker {gpus:g}" if cfg.dist.use_gpu and gpus != 1 else ""
    raise ConfigError(f"run {cfg.hash()[:12]} (dist.workers {need}, dist.cpus_per_worker "
                      f"{cfg.dist.cpus_per_worker:g}, dist.use_gpu {cfg.dist.use_gpu}{share}): {what}. The cluster: "
                      f"{listing}. Lower dist.workers / dist.cpus_per_worker, or add a node type that fits")


def admit(configs: list[Any], custom: dict[str, float] | None = None, gpus: float = 1.0) -> list[NodeType]:
    """Check every run against what the cluster could hold once scaled; returns the node types seen."""
    types = node_types()
    for cfg in configs:
        check_fits(cfg, types, custom, gpus)
    return types
