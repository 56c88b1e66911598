"""A grid's ``resources:`` — what every trial reserves on the Ray cluster — and the rule for GPU shares.

``workers``, ``cpus_per_worker``, ``use_gpu`` and ``zero_stage`` are mapped onto every run's ``dist.*`` section.
``gpus_per_worker`` and ``custom`` are placement only: they decide where a trial runs and how many trials share a
node, never what it computes, so they are not part of any run's config hash (a grid packed four trials to a GPU
dedups against the same grid run one trial per GPU).

GPU shares: ``gpus_per_worker`` is 1 (a whole device, the default with ``use_gpu``) or 1/k for a whole k ≥ 2 (0.5,
0.25, 0.2, 0.125, …; 1/3 as 0.3333), so that k one-worker trials fill one GPU exactly. More than one GPU per worker
is refused: one etbench worker drives one device (more GPUs per trial: more ``workers``). A share below 1 is
refused for a trial that runs under DeepSpeed (``dist.workers`` > 1 or ``dist.deepspeed``): each DeepSpeed rank is
bound to a whole device of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

#: Ray keeps resource amounts to 4 decimals: 1/k given to that precision is accepted as 1/k.
SHARE_TOLERANCE = 1e-3
ALLOWED_SHARES = "1 (a whole GPU) or 1/k for a whole k >= 2 (0.5, 0.25, 0.2, 0.125, …; 1/3 as 0.3333)"


def share_error(value: float) -> str | None:
    """Why ``value`` is not an allowed ``gpus_per_worker`` (None when it is)."""
    if value > 1:
        return (f"gpus_per_worker {value:g} is more than one GPU per worker: one etbench worker drives one device "
                f"(for more GPUs per trial raise resources.workers); allowed: {ALLOWED_SHARES}")
    k = round(1 / value)
    if k < 1 or abs(value * k - 1) > SHARE_TOLERANCE:
        return (f"gpus_per_worker {value:g} does not divide one GPU evenly (k trials of 1/k fill it exactly); "
                f"allowed: {ALLOWED_SHARES}")
    return None


class Resources(BaseModel):
    """Per trial: Ray Train workers and what each needs (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float | None = Field(None, gt=0, description=(
        "the GPU share each worker reserves: 1, or 1/k to pack k small trials on one GPU; implies use_gpu; "
        "placement only, not part of a run's config hash"))
    zero_stage: Literal[0, 1, 2, 3] = 0
    custom: dict[str, float] = Field(default_factory=dict, description=(
        "extra Ray resources every worker reserves, e.g. {'accelerator_type:A100': 0.001}; placement only, "
        "not part of a run's config hash"))

    @model_validator(mode="before")
    @classmethod
    def _share_implies_gpu(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gpus_per_worker") is not None:
            if data.get("use_gpu") is False:
                raise ValueError(f"gpus_per_worker {data['gpus_per_worker']} asks for a GPU share but use_gpu is "
                                 f"false; drop one of them (gpus_per_worker implies use_gpu: true)")
            data = {**data, "use_gpu": True}
        return data

    @field_validator("gpus_per_worker")
    @classmethod
    def _share_allowed(cls, v: float | None) -> float | None:
        if v is not None and (why := share_error(v)):
            raise ValueError(why)
        return v

    @field_validator("custom")
    @classmethod
    def _custom_not_cpu_gpu(cls, v: dict[str, float]) -> dict[str, float]:
        if {"CPU", "GPU"} & set(v):
            raise ValueError("custom resources may not name CPU or GPU: use cpus_per_worker / gpus_per_worker")
        return v

    @model_serializer(mode="wrap")
    def _unset_share_unlisted(self, handler: Any) -> Any:
        """Leave an unset ``gpus_per_worker`` out of the dump (``sweep plan`` prints the resources as before)."""
        data = handler(self)
        if isinstance(data, dict) and self.gpus_per_worker is None:
            data.pop("gpus_per_worker", None)
        return data

    @property
    def gpu_share(self) -> float:
        """The GPUs one worker reserves when its run uses a GPU (``dist.use_gpu``)."""
        return float(self.gpus_per_worker) if self.gpus_per_worker is not None else 1.0


def deepspeed_share_error(resources: Resources, cfg: Any) -> str | None:
    """Why a resolved run ``cfg`` cannot take the grid's GPU share (None when it can): a fraction of a GPU for a
    run under DeepSpeed, whose every rank needs a whole device."""
    d = cfg.dist
    if resources.gpu_share >= 1 or not d.use_gpu or d.in_process:
        return None
    return (f"resources.gpus_per_worker {resources.gpu_share:g} is a fraction of a GPU, but this trial runs under "
            f"DeepSpeed (dist.workers {d.workers}, dist.deepspeed {str(d.deepspeed).lower()}), whose every rank "
            f"needs a whole device; use gpus_per_worker: 1, or dist.workers: 1 with dist.deepspeed: false")


def trial_bundle(dist: dict[str, Any], gpus: float, custom: dict[str, float]) -> dict[str, float]:
    """The Ray Tune placement bundle of one trial, from its resolved ``dist`` section.

    A one-worker plain run trains inside the trial actor: it reserves the worker's CPUs and GPU share (and the
    custom resources). Any other run only drives a TorchTrainer whose workers reserve their CPUs/GPUs themselves,
    so the driver asks for a sliver of CPU and no GPU — a 1-worker DeepSpeed trial on a 1-GPU node must not hold
    the GPU it then asks for."""
    if int(dist.get("workers", 1)) == 1 and not dist.get("deepspeed", False):
        return {"CPU": float(dist.get("cpus_per_worker", 1.0)), **({"GPU": float(gpus)} if dist.get("use_gpu") else {}),
                **custom}
    return {"CPU": 0.1}
