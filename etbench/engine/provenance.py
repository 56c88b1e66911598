"""Where and how a run trained, as tags the training process sets on its MLflow run (``tracking/schema.py``).

The precision rule lives here once: :func:`trains_bf16` is the decision (bf16 asked for and a GPU to run it on) and
:func:`precision` names the regime it gives on each backend. A one-worker run (``PlainBackend``) keeps fp32 weights
and autocasts to bf16 ("autocast-bf16"); DeepSpeed with bf16 enabled holds bf16 parameters and reduces gradients
in bf16 ("bf16"); anything else trains in "fp32". Runs of different regimes are not the same experiment.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from etbench.engine.build import resolve_device
from etbench.tracking import schema as S
from etbench.tracking.provenance import code_hash, cpu_model, hostname

if TYPE_CHECKING:
    from etbench.config import RunConfig, TrainConfig

AUTOCAST_BF16, BF16, FP32 = "autocast-bf16", "bf16", "fp32"


def trains_bf16(train: TrainConfig, device_type: str) -> bool:
    """Whether a run trains with bf16: ``train.bf16`` and a CUDA device (bf16 is ignored on CPU)."""
    return device_type == "cuda" and bool(train.bf16)


def precision(bf16: bool, deepspeed: bool) -> str:
    """The regime tag of a run whose backend decided ``bf16`` (:func:`trains_bf16`): see the module doc."""
    if not bf16:
        return FP32
    return BF16 if deepspeed else AUTOCAST_BF16


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return cpu_model()


def node_ip() -> str:
    """This node's IP as Ray knows it (the address Ray Train groups workers by), else the host name's address."""
    if "ray" in sys.modules:  # never import Ray only to ask (a plain `etbench train` has none)
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "unknown"


def run_tags(device: torch.device | None, regime: str | None, nodes_spanned: int | None = None) -> dict[str, str]:
    """The provenance and placement tags of the process that trains (rank 0): code hash, host, node IP, and when
    known the device name, the precision regime and the number of nodes the run's workers span."""
    tags = {S.TAG_CODE_HASH: code_hash(), S.TAG_HOSTNAME: hostname(), S.TAG_NODE_IP: node_ip()}
    if device is not None:
        tags[S.TAG_DEVICE_NAME] = device_name(device)
    if regime is not None:
        tags[S.TAG_PRECISION] = regime
    if nodes_spanned is not None:
        tags[S.TAG_NODES_SPANNED] = str(nodes_spanned)
    return tags


def in_process_tags(cfg: RunConfig) -> dict[str, str]:
    """:func:`run_tags` of a one-worker run trained in this process: its device as ``run_single`` resolves it
    (none when that fails: the run fails there with the reason), its regime from :func:`trains_bf16`."""
    try:
        device = resolve_device(cfg.train.device, cfg.dist.use_gpu)
    except RuntimeError:
        return run_tags(None, None)
    return run_tags(device, precision(trains_bf16(cfg.train, device.type), deepspeed=False))


def nodes_spanned() -> int:
    """How many distinct Ray nodes the ranks of this torch.distributed group run on (a collective: every rank
    calls it; 1 without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 1
    import ray

    ids: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
    return len(set(ids))
