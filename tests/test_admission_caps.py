"""Admission caps (cluster-2 review, finding 5): alive worker nodes use up their node type's ``max_workers`` and the
autoscaler's global ``max_workers``; the shipped cluster/aws-gpu.yaml holds at most 10 GPUs (2 × g5.12xlarge +
2 × g5.xlarge under a global cap of 4 worker nodes), so a 12-worker GPU trial is refused with the numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from etbench import admission as A
from etbench.config import ConfigError, resolve_run_config

REPO = Path(__file__).resolve().parents[1]
HEAD = A.NodeType("node 10.0.0.1", {"CPU": 0.0, "node:__internal_head__": 1.0}, 1, True)


def _gpu_run(workers: int, cpus: float = 4) -> Any:
    return resolve_run_config({"task": {"kind": "image", "dataset": "digits"},
                               "dist": {"workers": workers, "cpus_per_worker": cpus, "use_gpu": True,
                                        "deepspeed": True}})


def _aws(monkeypatch: pytest.MonkeyPatch, alive: list[A.NodeType]) -> A.Cluster:
    monkeypatch.setenv(A.ENV_CLUSTER_CONFIG, str(REPO / "cluster" / "aws-gpu.yaml"))
    monkeypatch.setattr(A, "_gcs_types", lambda: [])
    monkeypatch.setattr(A, "_alive", lambda: alive)
    return A.cluster()


def _g5_12x(ip: str, label: str = "") -> A.NodeType:  # as ray.nodes() shows it: more keys than the YAML declares
    return A.NodeType(f"node {ip}", {"CPU": 48.0, "GPU": 4.0, "memory": 1e11, f"node:{ip}": 1.0,
                                     "accelerator_type:A10G": 1.0}, 1, True, label)


def test_the_shipped_aws_yaml_holds_ten_gpus_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    where = _aws(monkeypatch, [HEAD])
    assert where.max_workers == 4 and where.capacity(A.worker_bundle(_gpu_run(1))) == 10  # 2×4 + 2×1
    A.check_fits(_gpu_run(4), where)
    A.check_fits(_gpu_run(10), where)
    with pytest.raises(ConfigError) as err:  # the old count (4×1 + 2×4 = 12, each type at its full max) admitted it
        A.check_fits(_gpu_run(12), where)
    msg = str(err.value)
    assert "dist.workers 12" in msg and "12 workers × {CPU: 4, GPU: 1} need 12 such slots" in msg
    assert "can hold at most 10 once scaled" in msg and "global max_workers 4 worker nodes (0 alive)" in msg
    assert "node type ray.worker.gpu4 {CPU: 48, GPU: 4} (autoscaler max 2)" in msg


def test_alive_worker_nodes_use_up_their_type_and_the_global_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # two g5.12xlarge alive: they are the type's 2 and 2 of the 4 global; only 2 g5.xlarge may still come (10 GPUs),
    # where the old count added the alive nodes on top of every type's full max (8 + 12 = 20)
    where = _aws(monkeypatch, [HEAD, _g5_12x("10.0.0.2"), _g5_12x("10.0.0.3")])
    assert where.matched == {"node type ray.worker.gpu": 0, "node type ray.worker.gpu4": 2}
    assert [(t.group, t.max_count) for t in where.addable()] == [("ray.worker.gpu", 2)]
    assert where.capacity(A.worker_bundle(_gpu_run(1))) == 10
    with pytest.raises(ConfigError, match=r"can hold at most 10 once scaled.*gpu4 \{CPU: 48, GPU: 4\} \(autoscaler "
                       r"max 2\) with 2 alive; global max_workers 4 worker nodes \(2 alive\)"):
        A.check_fits(_gpu_run(11), where)
    A.check_fits(_gpu_run(10), where)


def test_a_node_is_matched_by_its_node_group_label_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # labelled as the 1-GPU type although its resources differ: it uses up a gpu slot, not a gpu4 one
    odd = A.NodeType("node 10.0.0.4", {"CPU": 8.0, "GPU": 1.0}, 1, True, "ray.worker.gpu")
    where = _aws(monkeypatch, [HEAD, odd])
    assert where.matched == {"node type ray.worker.gpu": 1, "node type ray.worker.gpu4": 0}
    assert where.capacity(A.worker_bundle(_gpu_run(1))) == 1 + 2 * 4 + 1  # itself, 2 × gpu4, 1 more gpu (cap 4)


def test_unmatched_alive_nodes_count_outside_the_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    by_hand = A.NodeType("node 10.0.0.9", {"CPU": 16.0, "GPU": 2.0}, 1, True)  # started by hand: no type
    where = _aws(monkeypatch, [HEAD, by_hand])
    assert sum(where.matched.values()) == 0 and where.capacity(A.worker_bundle(_gpu_run(1))) == 2 + 10


def test_a_global_cap_used_up_refuses_what_a_type_could_hold() -> None:
    cpu = A.NodeType("node type cpu", {"CPU": 8.0}, 4, False, "cpu")
    gpu = A.NodeType("node type gpu", {"CPU": 8.0, "GPU": 1.0}, 4, False, "gpu")
    alive = [A.NodeType(f"node 10.0.1.{i}", {"CPU": 8.0}, 1, True) for i in range(2)]
    where = A.Cluster.build([HEAD, *alive], [cpu, gpu], max_workers=2)
    with pytest.raises(ConfigError, match="need 1 such slots; the cluster can hold at most 0 once scaled"):
        A.check_fits(_gpu_run(1), where)
