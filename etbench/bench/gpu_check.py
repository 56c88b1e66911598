"""GPU check: paper-scale image ET train steps (both gradient modes) beside a FLOP-matched ViT, ``bench core`` on the
GPU and its XLA reference step — one JSON, in about five minutes.

Run by ``cluster/gpu_check.sh`` (which installs the ``make gpu-bundle`` wheels on a bare image first); never in CI,
except as ``--device cpu --tiny``, the smoke mode the test suite runs with the bare image's import set. Sections
(each in its own process, under a time limit, so a crash, hang or out-of-memory in one costs only that section):

- ``image``: :mod:`etbench.bench.gpu_train` — D 768, H 12, Y 64, M 3072, N 197, T 12 in bf16 through DeepSpeed
  ZeRO-2 (plain torch if DeepSpeed fails), images/s, peak memory and MFU per model; ``NGPU=k`` runs it under torchrun.
- ``core``: ``etbench.bench.core.run_core(out_dir, device, peer="xla")`` — the bare ET step, analytic vs autograd,
  and the same step compiled by XLA (JAX), interleaved.

Nothing here needs torch ≥ 2.13 (the image has 2.11): the paths use torch.autograd.Function, torch.func,
FlopCounterMode, fused AdamW and autocast, all older. The combined JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata as md
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of the H100 / H200 SXM (datasheet)
SECTIONS = ("image", "core")
SECTION_LIMIT_S = {"image": 200.0, "core": 110.0}
# CPU smoke sizes; peak memory on CPU would spawn a fresh process per mode (the GPU path reads the allocator)
TINY_CORE = {"dim": 32, "heads": 2, "head_dim": 16, "memories": 64, "tokens": 17, "batch": 4, "steps": 2,
             "repeats": 2, "measure_memory": False}
TERM_GRACE_S = 15.0  # between SIGTERM and SIGKILL of a section past its limit
TORCH_PIN = "2.13"  # pyproject's lower bound; the image's torch is older
VERSIONS = ("torch", "deepspeed", "pydantic", "pydantic-core", "jax", "jaxlib", "numpy", "triton", "typing-extensions")


def _fail(msg: str) -> int:
    print(f"gpu_check: {msg}", file=sys.stderr)
    return 2


def environment(device: str) -> dict[str, Any]:
    """Versions (from metadata, importing nothing heavy) and the device, for the JSON's header."""
    import torch

    def ver(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpu_count": os.cpu_count(), "device": device,
                           "versions": {n: ver(n) for n in VERSIONS}, "torch_runtime": torch.__version__,
                           "torch_cuda": torch.version.cuda}
    base = torch.__version__.split("+")[0]
    env["torch_below_pin"] = tuple(int(p) for p in base.split(".")[:2]) < tuple(int(p) for p in TORCH_PIN.split("."))
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_mem_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    return env


# --- sections (child processes) -------------------------------------------------------------------------------
def _init_dist(device: str) -> tuple[Any, int, int]:
    import torch
    import torch.distributed as dist

    from etbench.engine.ds_backend import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    local = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dev, dist.get_rank(), dist.get_world_size()


def image_section(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch.distributed as dist

    from etbench.bench.gpu_train import StepSettings, run_image_section

    s = StepSettings(steps=args.steps, warmup=args.warmup, batch=args.batch, zero=args.zero, engine=args.engine,
                     activation_checkpointing=args.activation_checkpointing, peak_tflops=args.peak_tflops,
                     max_seconds=args.max_seconds, tiny=args.tiny)
    dev, rank, world = _init_dist(args.device)
    try:
        out = run_image_section(s, world, dev)
    finally:
        dist.destroy_process_group()
    return out if rank == 0 else None


def core_section(args: argparse.Namespace) -> dict[str, Any]:
    """``run_core`` on the device with the XLA peer (which records why, when jax has no backend for the device);
    again without the peer if the peer's step itself fails."""
    from etbench.bench.core import run_core

    kwargs: dict[str, Any] = dict(TINY_CORE) if args.tiny else {}
    out: dict[str, Any] = {"call": {"device": args.device, "peer": "xla", **kwargs}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_core_") as tmp:
        try:
            out["report"] = run_core(Path(tmp), device=args.device, peer="xla", **kwargs)
        except Exception as exc:
            out["peer_error"] = f"{type(exc).__name__}: {exc}"
            print(f"gpu_check: bench core with the XLA peer failed ({out['peer_error']}); again without it",
                  flush=True)
            out["call"]["peer"] = None
            out["report"] = run_core(Path(tmp), device=args.device, peer=None, **kwargs)
    return out


def run_section(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (finally blocks) when the limit is reached
    result = image_section(args) if args.section == "image" else core_section(args)
    if result is not None:
        Path(args.section_out).write_text(json.dumps(result, indent=2, default=str))
    return 0


# --- orchestration ----------------------------------------------------------------------------------------------
def child_command(args: argparse.Namespace, section: str, out: Path) -> list[str]:
    """The command of one section's process (torchrun for the image section on several GPUs)."""
    flags = ["--section", section, "--section-out", str(out), "--device", args.device, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--batch", str(args.batch), "--zero", str(args.zero),
             "--engine", args.engine, "--max-seconds", str(args.max_seconds)]
    if args.peak_tflops:
        flags += ["--peak-tflops", str(args.peak_tflops)]
    flags += ["--tiny"] * args.tiny + ["--activation-checkpointing"] * args.activation_checkpointing
    if section == "image" and args.ngpu > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ngpu),
                "-m", "etbench.bench.gpu_check", *flags]
    return [sys.executable, "-m", "etbench.bench.gpu_check", *flags]


def run_child(cmd: list[str], limit_s: float, env: dict[str, str], tail_lines: int = 40) -> tuple[int | None, str]:
    """Run ``cmd`` echoing its output; kill its process group after ``limit_s``. (exit code or None, output tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"  | {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc: int | None = None
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        pass
    finally:  # past the limit, or this process is being stopped: the child's own session must not outlive it
        if proc.poll() is None:
            # SIGTERM first: the child turns it into SystemExit, so torch's JIT-build lock files are released
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    reader.join(timeout=5)
    return rc, "\n".join(tail)


def write_report(report: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)


def print_summary(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\n{env.get('gpu', env['device'])}: torch {env['torch_runtime']}, "
          f"deepspeed {env['versions'].get('deepspeed')}, jax {env['versions'].get('jax')}")
    img = report["sections"].get("image", {})
    for r in img.get("results", []):
        mfu = f"{100 * r['mfu']:5.1f} %" if r.get("mfu") is not None else "  n/a"
        mem = f"{r['peak_mem_gib']:6.2f} GiB" if r.get("peak_mem_gib") is not None else "   n/a"
        print(f"  {r['model']:4s} {r['grad_mode'] or ''!s:9s} {r['images_per_s']:9.1f} img/s "
              f"{r['step_ms']:8.1f} ms/step  peak {mem}  MFU {mfu}  ({r['engine']}, {r['optimizer']})")
    for e in img.get("errors", []):
        print(f"  error: {e['model']}/{e['grad_mode']} on {e['engine']}: {e['error']}")
    core = report["sections"].get("core", {})
    results = (core.get("report") or {}).get("results", {})
    for name, r in results.items():
        if isinstance(r, dict) and "median_s" in r:
            print(f"  bench core {name:9s} {1000 * r['median_s']:8.2f} ms/step")
    for name, sec in report["sections"].items():
        for key in ("skipped", "error", "peer_error"):
            if sec.get(key):
                print(f"  {name}: {key}: {str(sec[key]).splitlines()[0]}")


def orchestrate(args: argparse.Namespace) -> int:
    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: stop the running section too

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("no CUDA device is visible (torch.cuda.is_available() is False); run this on a GPU node, "
                     "or pass --device cpu --tiny for the CPU smoke run")
    env = dict(os.environ)
    if args.device == "cuda":
        if env.get("DS_ACCELERATOR", "cuda") != "cuda":
            return _fail(f"DS_ACCELERATOR={env['DS_ACCELERATOR']} would keep DeepSpeed off the GPU; unset it")
        if args.peak_tflops is None:
            args.peak_tflops = H100_BF16_TFLOPS
    else:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take 75 % of the GPU from torch
    env["PYTHONUNBUFFERED"] = "1"
    out = Path(args.out) if args.out else None
    report: dict[str, Any] = {"benchmark": "gpu_check", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "argv": sys.argv[1:], "environment": environment(args.device), "sections": {}}
    write_report(report, out)
    t_start = time.perf_counter()
    for section in args.sections:
        left = args.budget_s - (time.perf_counter() - t_start)
        limit = min(SECTION_LIMIT_S[section], left)
        if limit < 10:
            report["sections"][section] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            continue
        print(f"gpu_check: section {section} (limit {limit:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            sec_out = Path(tmp) / f"{section}.json"
            t0 = time.perf_counter()
            rc, tail = run_child(child_command(args, section, sec_out), limit, env)
            wall = time.perf_counter() - t0
            if rc == 0 and sec_out.exists():
                result = json.loads(sec_out.read_text())
            else:
                why = f"killed after its {limit:.0f} s limit" if rc is None else f"exited with code {rc}"
                result = {"error": f"section {section} {why}", "output_tail": tail}
        result["wall_s"] = wall
        report["sections"][section] = result
        write_report(report, out)
    report["wall_s"] = time.perf_counter() - t_start
    write_report(report, out)
    print_summary(report)
    if out is not None:
        print(f"gpu_check: wrote {out}")
    failed = [n for n, s in report["sections"].items() if "error" in s]
    image = report["sections"].get("image", {})
    if "image" in args.sections and not image.get("results"):
        failed.append("image (no figures)")
    return 1 if failed else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m etbench.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="CPU smoke sizes (digits preset at T = 2, tiny bench core)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--steps", type=int, default=100, help="timed steps per model (capped by --max-seconds)")
    p.add_argument("--max-seconds", type=float, default=12.0, help="timed seconds per model at most")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="images per GPU per step")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"device dense bf16 peak for MFU (default on cuda: {H100_BF16_TFLOPS}, H100/H200 SXM)")
    p.add_argument("--ngpu", type=int, default=int(os.environ.get("NGPU", "1")), help="GPUs for the image section")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for all sections")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_check.json, else results/)")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.out is None:
        a.out = str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "results/gpu_check.json"
    for name in ("steps", "warmup", "batch", "ngpu"):
        if getattr(a, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {getattr(a, name)}")
    if a.tiny and a.device == "cuda":
        p.error("--tiny is the CPU smoke mode: pass --device cpu with it")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.section:
        return run_section(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
