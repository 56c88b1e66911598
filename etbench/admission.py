"""Admission of runs onto a Ray cluster: queue what the cluster could hold once scaled, refuse what it never can.

A run of ``dist.workers`` workers asks Ray for one bundle per worker (``CPU: cpus_per_worker``, ``GPU: 1`` with
``dist.use_gpu`` — or the grid's ``gpus_per_worker`` share, 1/k of a GPU — plus the grid's custom resources); each
bundle must fit on one node. What the cluster can hold is its alive nodes plus the worker nodes its autoscaler may
still add, read from (first found):

1. a cluster config reported to the GCS (``ray._private.state.state.get_cluster_config()``: node groups with their
   resources and ``max_count``), when the deployment reports one — Ray 2.60's v1 autoscaler, the one tested here,
   does not;
2. an autoscaler YAML (``available_node_types`` with ``resources`` and ``max_workers``, and the global
   ``max_workers``): ``$ETBENCH_CLUSTER_CONFIG``, else ``~/ray_bootstrap_config.yaml``, which the Ray cluster
   launcher writes on the head node.

With neither (e.g. KubeRay without ``$ETBENCH_CLUSTER_CONFIG``), only the alive nodes count.

Every alive worker node is matched to its node type (the ``ray.io/node-group`` label where Ray sets it, else equal
CPU/GPU and declared custom resources) and uses up one of that type's ``max_workers`` and one of the global
``max_workers``; what may still be added is each type's remainder, the sum capped at the global remainder (filled
with the types that hold the most bundles first, which is the largest mix). Alive nodes that match no type (the
head, a node started by hand) count once each, outside the caps. Counting alive nodes *and* every type at its full
maximum, as before, admitted trials that could never be placed (cluster-2 review, finding 5).

A trial that fits only on a node type with no alive node is admitted: Ray queues it and the autoscaler adds the
node. One that fits no node type, or needs more workers than the cluster can ever hold, is refused up front with
the numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from etbench.config import ConfigError

ENV_CLUSTER_CONFIG = "ETBENCH_CLUSTER_CONFIG"
UNLIMITED = 10**6  # an autoscaler max of -1 (no limit), or no global max_workers
NODE_GROUP_LABEL = "ray.io/node-group"  # Ray's label for a node's type (set when RAY_NODE_TYPE_NAME is, e.g. KubeRay)
HEAD_RESOURCE = "node:__internal_head__"
_COMPARED = ("CPU", "GPU")  # always compared when matching a node to a type (absent = 0), with the declared rest


@dataclass(frozen=True)
class NodeType:
    """Something that can host bundles: an alive node (``max_count`` 1) or an autoscaler node type (``group``: its
    name in the autoscaler config; an alive node's ``group`` is its node-group label, if any)."""

    name: str
    resources: dict[str, float]
    max_count: int
    alive: bool
    group: str = ""

    def holds(self, bundle: dict[str, float]) -> int:
        """How many copies of ``bundle`` one node of this type holds."""
        fits = [self.resources.get(k, 0.0) / v for k, v in bundle.items() if v > 0]
        return math.floor(min(fits) + 1e-9) if fits else UNLIMITED

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items())
                        if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type:")))
        most = "unlimited" if self.max_count >= UNLIMITED else str(self.max_count)
        count = "alive" if self.alive else f"autoscaler max {most}"
        return f"{self.name} {{{res}}} ({count})"

    def matches(self, node: NodeType) -> bool:
        """Whether the alive ``node`` is one of this type's nodes (by label, else by resources)."""
        if node.group:
            return node.group == self.group
        keys = set(_COMPARED) | set(self.resources)
        return all(math.isclose(node.resources.get(k, 0.0), self.resources.get(k, 0.0)) for k in keys)


@dataclass(frozen=True)
class Cluster:
    """Alive nodes, the autoscaler's node types and its global cap on worker nodes (``max_workers``)."""

    alive: list[NodeType]
    types: list[NodeType]
    max_workers: int = UNLIMITED
    matched: dict[str, int] = field(default_factory=dict)  # type name -> alive nodes of that type

    @classmethod
    def build(cls, alive: Sequence[NodeType], types: Sequence[NodeType], max_workers: int = UNLIMITED) -> Cluster:
        matched: dict[str, int] = {t.name: 0 for t in types}
        for node in alive:
            if HEAD_RESOURCE in node.resources:
                continue  # the head is never one of the worker types
            for t in types:
                if t.matches(node) and matched[t.name] < t.max_count:
                    matched[t.name] += 1
                    break
        return cls(list(alive), list(types), max_workers, matched)

    @classmethod
    def of(cls, nodes: Sequence[NodeType] | Cluster) -> Cluster:
        """A :class:`Cluster` from a plain list of alive nodes and node types (no global cap), or as given."""
        if isinstance(nodes, Cluster):
            return nodes
        return cls.build([n for n in nodes if n.alive], [n for n in nodes if not n.alive])

    def workers_left(self) -> int:
        """Worker nodes the autoscaler may still add under its global cap."""
        return max(0, self.max_workers - sum(self.matched.values()))

    def addable(self) -> list[NodeType]:
        """The node types with the number of nodes each may still add (its remainder, at most the global one)."""
        left = self.workers_left()
        out = []
        for t in self.types:
            more = min(max(0, t.max_count - self.matched.get(t.name, 0)), left)
            if more > 0:
                out.append(replace(t, max_count=more))
        return out

    def capacity(self, bundle: dict[str, float]) -> int:
        """The most ``bundle`` copies the cluster can hold once scaled: every alive node, plus the addable nodes
        that hold the most copies first, until the global cap is used up."""
        total = sum(min(n.holds(bundle), UNLIMITED) for n in self.alive)
        left = self.workers_left()
        for t in sorted(self.addable(), key=lambda t: -t.holds(bundle)):
            take = min(t.max_count, left)
            total += min(t.holds(bundle), UNLIMITED) * take
            left -= take
        return total

    def listing(self) -> list[NodeType]:
        """Alive nodes and the node types with what each may still add (what :func:`node_types` returns)."""
        return self.alive + self.addable()

    def describe(self) -> str:
        parts = [n.describe() for n in self.alive]
        for t in self.types:
            alive = self.matched.get(t.name, 0)
            parts.append(t.describe() + (f" with {alive} alive" if alive else ""))
        if self.max_workers < UNLIMITED:
            parts.append(f"global max_workers {self.max_workers} worker nodes "
                         f"({sum(self.matched.values())} alive)")
        return "; ".join(parts) or "no nodes"


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
                     UNLIMITED if g.max_count == -1 else int(g.max_count), False, g.name or "")
            for g in config.node_group_configs if g.max_count != 0]


def _yaml_config() -> tuple[list[NodeType], int]:
    """The autoscaler YAML's worker node types and its global ``max_workers`` (UNLIMITED when absent)."""
    import yaml

    path = os.environ.get(ENV_CLUSTER_CONFIG) or str(Path.home() / "ray_bootstrap_config.yaml")
    if not Path(path).is_file():
        if os.environ.get(ENV_CLUSTER_CONFIG):
            raise ConfigError(f"${ENV_CLUSTER_CONFIG}={path}: no such file (an autoscaler cluster YAML)")
        return [], UNLIMITED
    doc = yaml.safe_load(Path(path).read_text()) or {}
    head = doc.get("head_node_type")
    cap = doc.get("max_workers")
    out = []
    for name, t in (doc.get("available_node_types") or {}).items():
        count = int(t.get("max_workers", cap or 0) or 0)
        if name == head or count == 0:
            continue  # the head is alive already
        out.append(NodeType(f"node type {name}", {k: float(v) for k, v in (t.get("resources") or {}).items()},
                            count, False, str(name)))
    return out, UNLIMITED if cap is None else int(cap)


def _yaml_types() -> list[NodeType]:
    return _yaml_config()[0]


def _alive() -> list[NodeType]:
    import ray

    return [NodeType(f"node {n.get('NodeManagerAddress')}", dict(n.get("Resources", {})), 1, True,
                     str((n.get("Labels") or {}).get(NODE_GROUP_LABEL, "")))
            for n in ray.nodes() if n.get("Alive")]


def cluster() -> Cluster:
    """The alive nodes and what the autoscaler may add (Ray must be initialised)."""
    gcs = _gcs_types()
    types, cap = (gcs, UNLIMITED) if gcs else _yaml_config()
    return Cluster.build(_alive(), types, cap)


def node_types() -> list[NodeType]:
    """Alive nodes and the node types the autoscaler may still add, each with the nodes it may still add."""
    return cluster().listing()


def check_fits(cfg: Any, types: Sequence[NodeType] | Cluster, custom: dict[str, float] | None = None,
               gpus: float = 1.0) -> None:
    """Raise ConfigError when the cluster (a :class:`Cluster`, or a list of alive nodes and node types) can never
    hold the run's ``dist.workers`` bundles (each with ``gpus`` GPUs when the run uses a GPU: a fraction packs
    several bundles on one GPU)."""
    where = Cluster.of(types)
    bundle = worker_bundle(cfg, custom, gpus)
    need = int(cfg.dist.workers)
    shown = "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"
    capacity = where.capacity(bundle)
    if capacity >= need:
        return
    fits_one = any(n.holds(bundle) > 0 for n in where.alive + where.types)
    what = (f"one worker needs {shown}, which no node or node type has" if not fits_one else
            f"{need} workers × {shown} need {need} such slots; the cluster can hold at most {capacity} once scaled")
    share = f", gpus_per_worker {gpus:g}" if cfg.dist.use_gpu and gpus != 1 else ""
    raise ConfigError(f"run {cfg.hash()[:12]} (dist.workers {need}, dist.cpus_per_worker "
                      f"{cfg.dist.cpus_per_worker:g}, dist.use_gpu {cfg.dist.use_gpu}{share}): {what}. The cluster: "
                      f"{where.describe()}. Lower dist.workers / dist.cpus_per_worker, or add a node type that fits")


def admit(configs: list[Any], custom: dict[str, float] | None = None, gpus: float = 1.0) -> list[NodeType]:
    """Check every run against what the cluster could hold once scaled; returns the nodes and node types seen."""
    where = cluster()
    for cfg in configs:
        check_fits(cfg, where, custom, gpus)
    return where.listing()
