"""A JAX/XLA reference of the ET training step that ``etbench bench core`` times, written from SPEC §1.

The step, like the authors' JAX code: T unrolled descent steps g = LN(x); x ← x − α ∂E/∂g with ∂E/∂g by
``jax.grad`` of the energy (so training differentiates a gradient: double backward), MSE loss against a target,
``jax.value_and_grad`` of the loss, AdamW (torch's update rule, decoupled weight decay), all under one ``jax.jit``.

Parameters are a flat dict of arrays taken from an :class:`~etbench.models.energy.EnergyTransformer`
(:func:`params_from_module`), so both frameworks start from the same point. jax is imported only when used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

GAMMA_MIN = 1e-4  # the same clamp as etbench.models.energy (γ stays > 0)
HN_BETA_MIN = 1e-6


def available() -> bool:
    """True when jax can be imported (the ``peers`` extra is installed)."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def _jax() -> Any:
    try:
        import jax
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the XLA peer needs jax and jaxlib: pip install 'etbench[peers]'") from e
    return jax


@dataclass(frozen=True)
class StepSpec:
    """What the step needs besides arrays: the ET dynamics (from ETConfig) and AdamW's hyper-parameters."""

    heads: int
    head_dim: int
    steps: int
    alpha: float
    eps: float
    self_attention: bool = True
    hn_kind: str = "relu"
    terms: str = "attn+hn"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.01

    @classmethod
    def from_torch(cls, cfg: Any, opt: torch.optim.Optimizer) -> StepSpec:
        """From an ETConfig and the torch AdamW whose update the JAX step must reproduce."""
        if type(opt).__name__ != "AdamW" or len(opt.param_groups) != 1:
            raise ValueError(f"the XLA peer reproduces one-group torch AdamW, got {type(opt).__name__} "
                             f"with {len(opt.param_groups)} groups")
        grp = opt.param_groups[0]
        if grp.get("amsgrad") or grp.get("maximize"):
            raise ValueError("the XLA peer does not implement AdamW amsgrad/maximize")
        return cls(heads=cfg.heads, head_dim=cfg.head_dim, steps=cfg.steps, alpha=cfg.alpha, eps=cfg.eps,
                   self_attention=cfg.self_attention, hn_kind=cfg.hn_kind, terms=cfg.terms, lr=float(grp["lr"]),
                   betas=(float(grp["betas"][0]), float(grp["betas"][1])), adam_eps=float(grp["eps"]),
                   weight_decay=float(grp["weight_decay"]))


def params_from_module(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The ET block's parameters as numpy arrays (names: gamma, delta, wq, wk, xi and hn_beta for softmax)."""
    out = {"gamma": model.norm.gamma, "delta": model.norm.delta, "wq": model.attn.wq, "wk": model.attn.wk,
           "xi": model.hn.xi}
    if getattr(model.hn, "beta", None) is not None:
        out["hn_beta"] = model.hn.beta
    return {k: v.detach().cpu().numpy().copy() for k, v in out.items()}


def grad_names() -> dict[str, str]:
    """JAX parameter name → the torch parameter name of the same tensor in EnergyTransformer."""
    return {"gamma": "norm.gamma", "delta": "norm.delta", "wq": "attn.wq", "wk": "attn.wk", "xi": "hn.xi",
            "hn_beta": "hn.beta"}


def used_params(spec: StepSpec) -> tuple[str, ...]:
    """Parameters the step trains: torch's AdamW skips (no update, no decay) those the energy terms do not use."""
    names = ["gamma", "delta"]
    if spec.terms in ("attn+hn", "attn"):
        names += ["wq", "wk"]
    if spec.terms in ("attn+hn", "hn"):
        names += ["xi"] + (["hn_beta"] if spec.hn_kind == "softmax" else [])
    return tuple(names)


def build_functions(spec: StepSpec) -> dict[str, Callable[..., Any]]:
    """Pure JAX functions of the step: ``energy``, ``descend``, ``loss`` and ``train_step`` (not jitted)."""
    jax = _jax()
    jnp = jax.numpy
    if spec.terms not in ("attn+hn", "attn", "hn") or spec.hn_kind not in ("relu", "softmax"):
        raise ValueError(f"unsupported terms={spec.terms!r} / hn_kind={spec.hn_kind!r}")
    beta = 1.0 / math.sqrt(spec.head_dim)
    use_attn, use_hn = spec.terms in ("attn+hn", "attn"), spec.terms in ("attn+hn", "hn")

    def layer_norm(p: dict[str, Any], x: Any) -> Any:
        xc = x - x.mean(-1, keepdims=True)
        gamma = jnp.maximum(p["gamma"], GAMMA_MIN)
        return gamma * xc * jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + spec.eps) + p["delta"]

    def energy(p: dict[str, Any], g: Any) -> Any:
        """Total energy of the batch, E^ATT + E^HN summed over samples (SPEC §1.2, §1.3)."""
        e = jnp.zeros((), g.dtype)
        if use_attn:
            q = jnp.einsum("bnd,hyd->bhny", g, p["wq"])
            k = jnp.einsum("bnd,hyd->bhny", g, p["wk"])
            s = beta * jnp.einsum("bhcy,bhky->bhck", q, k)
            if not spec.self_attention:
                n = g.shape[-2]
                s = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, s)
            e = e - jax.nn.logsumexp(s, -1).sum() / beta
        if use_hn:
            h = g @ p["xi"].T
            if spec.hn_kind == "relu":
                e = e - 0.5 * jnp.square(jax.nn.relu(h)).sum()
            else:
                b = jnp.maximum(p["hn_beta"], HN_BETA_MIN)
                e = e - jax.nn.logsumexp(b * h, -1).sum() / b
        return e

    grad_g = jax.grad(energy, argnums=1)

    def descend(p: dict[str, Any], x: Any) -> Any:
        for _ in range(spec.steps):  # unrolled under jit, like the authors' code
            x = x - spec.alpha * grad_g(p, layer_norm(p, x))
        return x

    def loss(p: dict[str, Any], x: Any, target: Any) -> Any:
        return jnp.mean(jnp.square(descend(p, x) - target))

    def train_step(p: dict[str, Any], opt: dict[str, Any], x: Any, target: Any) -> tuple[Any, Any, Any, Any]:
        """(loss, grads, new params, new AdamW state): torch.optim.AdamW's rule, decoupled weight decay."""
        value, grads = jax.value_and_grad(loss)(p, x, target)
        b1, b2 = spec.betas
        t = opt["t"] + 1
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        new_p, new_m, new_v = {}, {}, {}
        for name, w in p.items():
            gr = grads[name]
            m = b1 * opt["m"][name] + (1.0 - b1) * gr
            v = b2 * opt["v"][name] + (1.0 - b2) * gr * gr
            w = w * (1.0 - spec.lr * spec.weight_decay)
            denom = jnp.sqrt(v) / jnp.sqrt(bc2) + spec.adam_eps
            new_p[name] = w - (spec.lr / bc1) * m / denom
            new_m[name], new_v[name] = m, v
        return value, grads, new_p, {"t": t, "m": new_m, "v": new_v}

    return {"layer_norm": layer_norm, "energy": energy, "descend": descend, "loss": loss, "train_step": train_step}


def init_opt_state(params: dict[str, Any]) -> dict[str, Any]:
    """AdamW state at step 0 (zero moments), as jax arrays of the parameters' dtypes."""
    jnp = _jax().numpy
    return {"t": jnp.zeros((), jnp.int32), "m": {k: jnp.zeros_like(v) for k, v in params.items()},
            "v": {k: jnp.zeros_like(v) for k, v in params.items()}}


def jax_device(device: str) -> Any:
    """The jax device standing for etbench's ``device``: CPU for ``cpu``, the first GPU for ``cuda[:i]``."""
    jax = _jax()
    if device.startswith("cuda"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as e:
            raise RuntimeError(f"jax has no GPU backend here (install jax[cuda]); devices: {jax.devices()}") from e
        idx = int(device.split(":")[1]) if ":" in device else 0
        return gpus[idx]
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    return jax.devices("cpu")[0]


class XLAStep:
    """One training step on fixed inputs, compiled ahead of time, with its own parameters and AdamW state (donated
    each call, so a call is pure execution)."""

    def __init__(self, spec: StepSpec, params: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray,
                 device: str = "cpu") -> None:
        jax = _jax()
        self.device = jax_device(device)
        put = lambda a: jax.device_put(a, self.device)  # noqa: E731
        self.params = {k: put(params[k]) for k in used_params(spec)}
        self.opt = jax.device_put(init_opt_state(self.params), self.device)
        self.x, self.target = put(x), put(target)
        fns = build_functions(spec)

        def step(p: Any, opt: Any, x: Any, target: Any) -> tuple[Any, Any, Any]:
            value, _, new_p, new_opt = fns["train_step"](p, opt, x, target)
            return value, new_p, new_opt

        self._compiled = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.opt, self.x,
                                                                    self.target).compile()

    def __call__(self) -> float:
        value, self.params, self.opt = self._compiled(self.params, self.opt, self.x, self.target)
        return float(value.block_until_ready())

    def cost_flops(self) -> float | None:
        """FLOPs of the compiled step by XLA's cost analysis (all ops, not only matmuls), when available."""
        try:
            cost = self._compiled.cost_analysis()
        except Exception:  # not every backend implements it
            return None
        if isinstance(cost, list):
            cost = cost[0] if cost else None
        return float(cost["flops"]) if cost and "flops" in cost else None

    def memory_analysis(self) -> dict[str, float] | None:
        """XLA's own account of the compiled step's buffers (MiB), when the backend provides one."""
        try:
            ma = self._compiled.memory_analysis()
        except Exception:  # not every backend implements it
            return None
        if ma is None:
            return None
        fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
        return {f.replace("_in_bytes", "_mb"): getattr(ma, f) / 2**20 for f in fields if hasattr(ma, f)}


def loss_and_grads(spec: StepSpec, params: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray,
                   ) -> tuple[float, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(loss, ∂loss/∂params, params after one AdamW step) of one step, in the arrays' dtype (x64 for float64);
    only the parameters the energy uses (:func:`used_params`) appear."""
    jax = _jax()
    fns = build_functions(spec)
    p = {k: jax.numpy.asarray(params[k]) for k in used_params(spec)}
    value, grads, new_p, _ = jax.jit(fns["train_step"])(p, init_opt_state(p), jax.numpy.asarray(x),
                                                        jax.numpy.asarray(target))
    return float(value), {k: np.asarray(v) for k, v in grads.items()}, {k: np.asarray(v) for k, v in new_p.items()}


def dot_rate(rows: int, inner: int, cols: int, device: str = "cpu", repeats: int = 20) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of a jitted (rows × inner) @ (inner × cols) on jax's device for ``device``."""
    import time

    jax = _jax()
    dev = jax_device(device)
    rng = np.random.default_rng(0)
    a = jax.device_put(rng.standard_normal((rows, inner), dtype=np.float32), dev)
    b = jax.device_put(rng.standard_normal((inner, cols), dtype=np.float32), dev)
    f = jax.jit(lambda u, v: u @ v).lower(a, b).compile()
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * rows * inner * cols / best / 1e9
