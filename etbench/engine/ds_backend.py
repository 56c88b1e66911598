"""DeepSpeed execution backend: the :class:`~etbench.engine.backend.Backend` protocol around a DeepSpeed engine.

One instance per worker process, created after the process group exists (Ray Train's TorchTrainer, torchrun, or
the env-var world of a single process). ZeRO stage 0–3, fp32 on CPU / bf16 on GPU, clipping, accumulation and the
LR schedule all come from :func:`ds_config` and the run config; the optimizer is ``torch.optim.AdamW`` on CPU and
DeepSpeed's FusedAdam on GPU (Rajbhandari et al., "ZeRO", SC 2020; the DeepSpeed library's config schema).

ZeRO-3 fetches a module's parameters only around that module's ``forward`` and frees their storage afterwards, so
autograd must never hold a *view* of a parameter (the ET keeps ``ξᵀ``, reshaped ``W^Q`` … for backward). Models
that read weights outside submodule forwards (the ET's ``descend``) are therefore wrapped in :class:`_GatheredRoot`:
a ZeRO-3 *leaf* whose forward gathers every parameter, runs the model on differentiable clones of them
(``torch.func.functional_call``) and lets DeepSpeed free the gathered storage; at rest each rank keeps 1/N.
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from etbench.config import ConfigError, RunConfig
from etbench.engine.backend import make_scheduler, optimizer_groups, rng_state, set_rng_state
from etbench.engine.provenance import trains_bf16

CKPT_TAG = "ds"
_NEVER = 10**9


def check_dist_config(cfg: RunConfig) -> None:
    """Combinations pydantic cannot see; raises :class:`ConfigError` naming the field."""
    d = cfg.dist
    if d.offload and d.zero_stage == 0:
        raise ConfigError("dist.offload needs dist.zero_stage 1, 2 or 3 (ZeRO-Offload moves the partitioned "
                          "optimizer state to the CPU)")
    if d.offload and not d.use_gpu:
        raise ConfigError("dist.offload needs dist.use_gpu: true (offloading to the CPU from a CPU run is meaningless)")
    if d.activation_checkpointing and cfg.model.name != "et":
        raise ConfigError(f"dist.activation_checkpointing checkpoints the ET's descent steps; model.name "
                          f"{cfg.model.name!r} has none (use model.name: et)")


def check_accelerator(cfg: RunConfig) -> str:
    """DeepSpeed's accelerator in this process must match ``dist.use_gpu``: a ``DS_ACCELERATOR=cpu`` left over
    from CPU work would otherwise turn a GPU run into a CPU run without a word. Returns the accelerator's name."""
    from deepspeed.accelerator import get_accelerator

    name = str(get_accelerator().device_name())
    if cfg.dist.use_gpu and name != "cuda":
        raise ConfigError(f"dist.use_gpu is set but DeepSpeed's accelerator in this worker is {name!r} "
                          f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '<unset>')}); unset DS_ACCELERATOR "
                          f"in the cluster's / job's runtime env (etbench sets it per run), or set dist.use_gpu: false")
    return name


def fp32_copy(module: nn.Module, masters: dict[str, Tensor | None] | None = None) -> nn.Module:
    """A copy of ``module`` with fp32 parameters: the optimizer's fp32 master values where ``masters`` has them
    (bf16 training keeps the exact weights there), else the module's own values upcast."""
    plain = copy.deepcopy(module).float()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            m = (masters or {}).get(name)
            if m is not None:
                p.copy_(m.reshape(p.shape).to(p.device, torch.float32))
    return plain


def ds_config(cfg: RunConfig, world_size: int, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: batch split, ZeRO stage (+ offload), precision, clipping."""
    check_dist_config(cfg)
    if world_size < 1 or micro_batch < 1:
        raise ValueError(f"ds_config needs world_size >= 1 and micro_batch >= 1, got {world_size}, {micro_batch}")
    d = cfg.dist
    bf16 = trains_bf16(cfg.train, "cuda" if d.use_gpu else "cpu")  # the one precision rule
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage == 3:
        # partition every parameter (DeepSpeed keeps tensors < 1e5 elements whole by default, i.e. all of a small ET)
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_model_persistence_threshold"] = 0
    if d.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": micro_batch * d.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,  # per rank, despite the name
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": float(cfg.train.grad_clip or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a client torch.optim.AdamW under ZeRO
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The same groups as :func:`etbench.engine.backend.make_optimizer` (decay split, μP lr multipliers)."""
    return optimizer_groups(model, lr, weight_decay)


def make_ds_optimizer(model: nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, its name): torch AdamW on CPU; DeepSpeedCPUAdam with offload; FusedAdam on GPU when it loads."""
    t = cfg.train
    groups = param_groups(model, t.lr, t.weight_decay)
    kw = {"lr": t.lr, "betas": (t.beta1, t.beta2)}
    if cfg.dist.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "deepspeed.DeepSpeedCPUAdam"
    if cfg.dist.use_gpu:
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw), "deepspeed.FusedAdam"
        except Exception as exc:  # the op needs nvcc for its JIT build; say so and use torch's fused AdamW
            print(f"[etbench] DeepSpeed FusedAdam unavailable ({type(exc).__name__}: {exc}); "
                  f"using torch.optim.AdamW(fused=True)", flush=True)
            return torch.optim.AdamW(groups, fused=True, **kw), "torch.AdamW(fused)"
    return torch.optim.AdamW(groups, **kw), "torch.AdamW"


def _et_blocks(model: nn.Module) -> list[nn.Module]:
    """The Energy Transformer blocks in ``model`` (duck-typed: they descend on their energy's gradient)."""
    return [m for m in model.modules() if callable(getattr(m, "descend", None)) and hasattr(m, "energy_grad")]


def checkpoint_descent_steps(model: nn.Module) -> int:
    """Recompute each ET descent step's energy gradient in backward instead of storing its activations.

    Wraps ``energy_grad`` of every ET block in ``model`` (an instance attribute; the class is untouched) with
    non-reentrant ``torch.utils.checkpoint`` while training with grad enabled. Returns how many blocks were wrapped.
    """
    wrapped = 0
    for m in _et_blocks(model):
        if "energy_grad" in m.__dict__:
            continue
        plain = m.energy_grad

        def energy_grad(self: nn.Module, g: Tensor, *args: Any, _plain: Callable[..., Any] = plain,
                        **kwargs: Any) -> Any:
            if self.training and torch.is_grad_enabled():
                return checkpoint(_plain, g, *args, use_reentrant=False, **kwargs)
            return _plain(g, *args, **kwargs)

        m.energy_grad = types.MethodType(energy_grad, m)  # type: ignore[method-assign]
        wrapped += 1
    return wrapped


def lift_scalar_parameters(model: nn.Module) -> list[str]:
    """Replace every 0-dim parameter (the ET's γ, softmax-HN β) by a 1-element vector, in place; returns names.

    DeepSpeed 0.19 mishandles 0-dim parameters (its model broadcast views each parameter as bytes, its gradient
    clipping multiplies by a (1,) coefficient in place); the ET's formulas broadcast a (1,) scalar identically.
    """
    names = []
    for prefix, m in model.named_modules():
        for n, p in list(m._parameters.items()):
            if p is not None and p.dim() == 0:
                m._parameters[n] = nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
                names.append(f"{prefix}.{n}" if prefix else n)
    return names


class DeepSpeedBackend:
    """A DeepSpeed engine behind the Backend protocol; ``model`` is what the loop and task call.

    Every rank must call ``train_step``, ``save``, ``load``, ``full_model`` and enter/leave eval mode together:
    they are collectives. Under ZeRO-3, ``model`` switched to eval mode runs a gathered plain copy of the weights,
    so evaluation needs no collectives (shards may hold different numbers of batches).
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, steps_per_epoch: int, device: torch.device,
                 micro_batch: int, *, model_factory: Callable[[], nn.Module] | None = None) -> None:
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedBackend needs an initialised torch.distributed process group (Ray Train "
                               "worker, torchrun, or MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE for one process)")
        check_accelerator(cfg)
        self.cfg, self.device = cfg, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage = cfg.dist.zero_stage
        self.config = ds_config(cfg, self.world_size, micro_batch)
        self.bf16 = bool(self.config["bf16"]["enabled"])
        if cfg.dist.activation_checkpointing:
            checkpoint_descent_steps(model)
        lift_scalar_parameters(model)
        self.net = model.to(device)
        root: nn.Module = model
        if self.stage == 3 and model_factory is None:
            raise ValueError("ZeRO-3 needs model_factory (builds the same model) to materialise full weights for "
                             "evaluation and artifacts")
        if self.stage == 3 and _et_blocks(model):  # the ET reads its weights outside submodule forwards
            from deepspeed.utils import set_z3_leaf_module

            root = _GatheredRoot(model)
            set_z3_leaf_module(root, True)
        opt, self.optimizer_name = make_ds_optimizer(model, cfg)
        updates = max(1, steps_per_epoch // cfg.dist.grad_accum)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=root, optimizer=opt, config=self.config, lr_scheduler=lambda o: make_scheduler(o, cfg.train, updates))
        self._factory = model_factory
        # evaluation runs on full fp32 weights (ZeRO-3: gathered; bf16: the optimizer's fp32 masters)
        self.model: nn.Module = _EvalView(self) if self.stage == 3 or self.bf16 else self.engine

    # --- Backend protocol ------------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        return self.net

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed holds the module in bf16 itself; inputs arrive in bf16

    def eval_autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Around evaluation of :meth:`full_model` under bf16: fp32 weights with bf16 autocast, as a one-worker GPU
        run evaluates (``PlainBackend.autocast``), instead of the bf16-cast weights DeepSpeed trains with."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def train_step(self, loss: Tensor) -> bool:
        """Backward one micro-batch (DeepSpeed scales by 1/accumulation); step at boundaries."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        return bool(boundary)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (model, partitioned optimizer, scheduler, ``client_state``) + this rank's RNG."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=CKPT_TAG, client_state={"etbench": client_state})
        torch.save(rng_state(self.device), directory / f"rng_rank{self.rank}.pt")

    def load(self, directory: Path) -> dict[str, Any]:
        directory = Path(directory)
        path, client = self.engine.load_checkpoint(str(directory), tag=CKPT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None or "etbench" not in (client or {}):
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {CKPT_TAG!r} under {directory}")
        rng = directory / f"rng_rank{self.rank}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=True), self.device)
        return client["etbench"]

    # --- extras ----------------------------------------------------------------------------------------------
    def full_model(self) -> nn.Module:
        """A plain module with the full current weights on every rank (a collective under ZeRO-3 and bf16).

        Under bf16 it is an fp32 copy holding the optimizer's fp32 master weights, so evaluation, energy traces
        and artifacts see the weights a one-worker fp32/autocast run would have (evaluate it under
        :meth:`eval_autocast`)."""
        if self.stage != 3:
            return fp32_copy(self.engine.module, self._fp32_masters()) if self.bf16 else self.engine.module
        import deepspeed

        assert self._factory is not None
        with deepspeed.zero.GatheredParameters(list(self.net.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        plain = self._factory()
        shapes = {k: v.shape for k, v in plain.state_dict().items()}
        plain.load_state_dict({k: v.reshape(shapes[k]) if k in shapes else v for k, v in state.items()})
        if self.bf16:
            return fp32_copy(plain.to(self.device), self._fp32_masters())
        return plain.to(self.device, dtype=next(iter(state.values())).dtype)

    def _fp32_masters(self) -> dict[str, Tensor | None]:
        """Full fp32 master value of every parameter (a collective: every rank calls it); None where unknown."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, Tensor | None] = {}
        for name, p in self.net.named_parameters():
            try:
                out[name] = safe_get_full_fp32_param(p)
            except Exception:  # an optimizer DeepSpeed keeps no fp32 mapping for: upcast the bf16 value instead
                out[name] = None
        return out

    def partitioned_elements(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole model); equal unless ZeRO-3 partitions them."""
        held = total = 0
        for p in self.net.parameters():
            if hasattr(p, "ds_tensor"):
                held += p.ds_tensor.numel()
                total += p.ds_numel
            else:
                held += p.numel()
                total += p.numel()
        return held, total

    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that actually updates (DeepSpeed's ZeRO wrappers hold it as ``.optimizer``)."""
        opt = self.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


class _GatheredRoot(nn.Module):
    """ZeRO-3 leaf around a model that reads its weights outside submodule forwards (the ET).

    The forward runs the model on fresh copies ``p + 0·anchor`` of its gathered parameters
    (``torch.func.functional_call``), so autograd never keeps a view of storage DeepSpeed frees after the forward;
    gradients flow back to the parameters through the copies. ``anchor`` (a scalar requiring grad) makes the
    module's input require grad, so DeepSpeed's leaf-module hook (a full backward hook, which fires when the
    gradients of the module's *inputs* are done) runs only after every parameter gradient has been accumulated.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, anchor: Tensor, *args: Any, **kwargs: Any) -> Any:
        params = {n: torch.add(p, anchor.to(p.dtype), alpha=0) for n, p in self.inner.named_parameters()}
        return torch.func.functional_call(self.inner, params, args, kwargs)


class _EvalView(nn.Module):
    """What the loop sees under ZeRO-3 or bf16: the engine while training; in eval mode the full fp32 plain copy
    (:meth:`DeepSpeedBackend.full_model`), run under :meth:`DeepSpeedBackend.eval_autocast`."""

    def __init__(self, backend: DeepSpeedBackend) -> None:
        super().__init__()
        self._backend = [backend]  # a list keeps the backend out of nn.Module's registry
        self.engine = backend.engine
        self._plain: nn.Module | None = None

    def train(self, mode: bool = True) -> _EvalView:
        super().train(mode)
        if mode:
            self._plain = None
        elif self._plain is None:
            self._plain = self._backend[0].full_model().eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training and self._plain is not None:
            with self._backend[0].eval_autocast():
                return self._plain(*args, **kwargs)
        if isinstance(self.engine.module, _GatheredRoot):
            anchor = torch.zeros((), device=self._backend[0].device, requires_grad=True)
            return self.engine(anchor, *args, **kwargs)
        return self.engine(*args, **kwargs)

    @property
    def module(self) -> nn.Module:  # type: ignore[override]
        return self._plain if self._plain is not None else self._backend[0].net


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for a local process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_process_group(backend: str = "gloo") -> Iterator[None]:
    """A world-1 process group from MASTER_* env vars (set here, loopback, when absent), torn down on exit."""
    import os

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend)
    try:
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
