"""Start a loopback-only local Ray whose own processes know its address.

Ray's state API, used inside the cluster (e.g. Ray Train V2's ``PlacementGroupCleaner``, which frees a stopped
trial's worker placement group once its controller is gone), finds "the" cluster from ``RAY_ADDRESS`` or by
scanning this machine for GCS processes; with two local Rays on one machine (two sweeps, or a sweep beside a test)
the scan fails ("Found multiple active Ray instances") and the placement group is never freed, so the next
distributed trial waits for resources that never come. So the GCS gets a port chosen here
(``RAY_GCS_SERVER_PORT``, read by Ray when it starts the head) and every worker gets ``RAY_ADDRESS`` pointing at it;
and the state API itself (the dashboard process) is started where the cleaner will be needed.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_local_ray(node_ip: str, env_vars: dict[str, str] | None = None, *, state_api: bool = False,
                   **kwargs: Any) -> None:
    """``ray.init(address="local", _node_ip_address=node_ip, …)`` with ``RAY_ADDRESS`` in the job's env vars.

    ``state_api``: also start the dashboard process (bound to 127.0.0.1), which serves Ray's state API; the Train
    V2 placement-group cleaner needs it whenever a Ray Train controller can die without shutting down (a tuning
    trial stopped early by its scheduler)."""
    import ray

    if state_api:
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1")

    port = _free_port(node_ip)
    env = {**(env_vars or {}), "RAY_ADDRESS": f"{node_ip}:{port}"}
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(address="local", _node_ip_address=node_ip, runtime_env={"env_vars": env}, **kwargs)
    finally:  # only this start uses the port; a later local start picks its own
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before
