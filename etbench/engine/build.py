"""Build a run's task and model from its resolved config (shared by single-process and Ray Train workers)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from etbench.config import GraphClsTaskConfig, GraphTaskConfig, ImageTaskConfig, RunConfig
from etbench.models import registry
from etbench.models.width_param import apply_mup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str, use_gpu: bool = False) -> torch.device:
    """'auto' → cuda when available, else cpu; asking for cuda without one is an error."""
    if choice == "cuda" or use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda (or dist.use_gpu is true) but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "auto" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_inputs(cfg: RunConfig, data_info: dict[str, Any]) -> dict[str, Any]:
    """What the task's data fixes about the model (see ``etbench.models.entry``): the image geometry, or the node
    feature width."""
    if isinstance(cfg.task, ImageTaskConfig):
        return {"image_shape": tuple(data_info["image_shape"]), "patch": cfg.task.patch or 1}
    if isinstance(cfg.task, GraphClsTaskConfig):
        return {"in_dim": int(data_info["num_features"]), "num_classes": int(data_info["num_classes"]),
                "pe_dim": cfg.task.pe_dim}
    return {"in_dim": int(data_info["num_features"])}


def build_model(cfg: RunConfig, data_info: dict[str, Any]) -> nn.Module:
    """The registered model for this run (seeded, on CPU)."""
    seed_everything(cfg.train.seed)
    kind, name = cfg.task.kind, cfg.model.name
    model = registry.build(kind, name, **model_inputs(cfg, data_info), **registry.options(kind, name, cfg.model))
    if cfg.model.param == "mup":  # re-initialise for μP and attach the per-parameter lr multipliers
        apply_mup(model, cfg.model.base_width)
    return model


def build_task(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1,
               input_dtype: torch.dtype = torch.float32) -> Any:
    """Load the data and wrap it as the loop's Task for this worker."""
    if isinstance(cfg.task, ImageTaskConfig):
        from etbench.data.images import load_image_dataset
        from etbench.tasks.image_task import ImageTask

        t = cfg.task
        from etbench.data.paths import resolve_data_path

        splits = load_image_dataset(t.dataset, resolve_data_path(t.root), seed=cfg.train.seed,
                                    val_fraction=t.val_fraction, limit_train=t.limit_train,
                                    limit_eval=t.limit_eval, image_size=t.image_size)
        if t.patch is None:
            raise ValueError("task.patch is not set (no preset for this dataset); give task.patch")
        return ImageTask(cfg, splits, t.patch, device, rank, world, input_dtype)
    if isinstance(cfg.task, GraphClsTaskConfig):
        from etbench.tasks.graphcls_task import GraphClsTask

        return GraphClsTask.from_config(cfg, device, rank, world, input_dtype)
    assert isinstance(cfg.task, GraphTaskConfig)
    from etbench.tasks.graph_task import GraphTask

    return GraphTask.from_config(cfg, device, rank, world, input_dtype)


def model_cost(model: nn.Module) -> dict[str, float]:
    core = getattr(model, "module", model)
    params = sum(p.numel() for p in core.parameters())
    flops = float(core.flops_per_image()) if hasattr(core, "flops_per_image") else float("nan")
    if hasattr(core, "flops_per_sample"):
        flops = float(core.flops_per_sample())
    return {"params": float(params), "flops_per_sample": flops}
