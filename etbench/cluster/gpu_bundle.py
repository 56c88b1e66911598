"""The wheel bundle that lets the GPU check run on a bare CUDA image, and its install there.

The lent GPU machine (the workplace's ``cuda`` image: Python 3.12, torch 2.11 + CUDA, JAX, Triton, numpy, …) has
no pydantic and no DeepSpeed, and cannot reach a package index. ``make gpu-bundle`` runs :func:`build` here: it
walks the ``Requires-Dist`` metadata of :data:`ROOTS` as installed in this venv (so the bundle holds the very
versions the test suite runs), stops at distributions the image already holds at a satisfying version, downloads
the rest as cp312 manylinux x86_64 wheels and builds DeepSpeed (an sdist on PyPI) as a pure wheel with
``DS_BUILD_OPS=0`` (its ops JIT-compile on the GPU node, which has nvcc and ninja). :func:`install` runs there,
standard library + ``packaging`` only, and installs into a target directory just the wheels the image lacks.

Standard library + ``packaging`` only: this module must import on the bare image before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from etbench.errors import EtbenchError

ROOTS = ("pydantic", "deepspeed")  # what the GPU check imports beyond the image: etbench.config, the engine
BUILD_FROM_SDIST = frozenset({"deepspeed"})  # PyPI has no wheel of these; built here as pure wheels
SIZE_LIMIT_MIB = 64.0  # the device tool's transfer limit (working tree + carried paths)
SIZE_TARGET_MIB = 16.0  # "far under" the limit: leaves the working tree its room
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MAX_GLIBC_MINOR = 39  # the image is Python 3.12.3 on a glibc ≤ 2.39 distribution

# Distributions of the device image 'cuda' (the device tool's KINDS.md, package list read 2026-11-17; versions only
# where its pip-list row gives them). None: present, version not recorded.
IMAGE_VERSIONS: dict[str, str | None] = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2",
    "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2", "numpyro": "0.21.0", "onnx": "1.23.1",
    "onnx-ir": "1.0.0", "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1", "torchaudio": "2.11.0",
    "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "triton": "3.6.0",
    **dict.fromkeys((
        "absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi "
        "charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core "
        "cuda-pathfinder cuda-toolkit cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers "
        "flax fonttools formulaic frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna "
        "imageio iniconfig interface-meta jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities "
        "linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes "
        "mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba "
        "numba-cuda nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 "
        "nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 "
        "nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx opencv-python-headless "
        "optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip "
        "pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments "
        "pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout "
        "pytest-xdist python-dateutil pyyaml regex requests rich sacrebleu scikit-build-core scikit-image "
        "scikit-learn scipy seaborn setuptools shellingham simplejson six sortedcontainers statsmodels sympy "
        "tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile timm toolz tqdm treescope "
        "typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash "
        "yarl zipp"
    ).split()),
}

TARGET_ENV: dict[str, str] = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                              "implementation_name": "cpython", "platform_python_implementation": "CPython",
                              "sys_platform": "linux", "os_name": "posix", "platform_system": "Linux",
                              "platform_machine": "x86_64", "extra": ""}


class BundleError(EtbenchError, RuntimeError):
    """The bundle is incomplete, has two versions of one distribution, or a wheel that cannot install there."""


@dataclass(frozen=True)
class Need:
    """One distribution the bundle carries: its name, the version to carry, who requires it and with what."""

    name: str
    version: str
    required_by: tuple[str, ...]
    specifiers: tuple[str, ...]  # version specifiers its requirers put on it ('' for none)
    on_image: bool = False  # the image holds it, at an unrecorded or too old version

    @property
    def conditional(self) -> bool:
        """The image holds this distribution: it is installed there only if the image's version does not do."""
        return self.on_image

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def _requires_of_installed(name: str) -> list[str]:
    return list(md.requires(name) or [])


def _version_of_installed(name: str) -> str:
    return md.version(name)


def _image_satisfies(req: Requirement, image: Mapping[str, str | None]) -> bool:
    """The image holds ``req``'s distribution at a version known to satisfy it (no specifier: any version)."""
    name = canonicalize_name(req.name)
    if name not in image:
        return False
    if not req.specifier:
        return True
    known = image[name]
    return known is not None and req.specifier.contains(Version(known), prereleases=True)


def closure(roots: Iterable[str] = ROOTS, *, requires: Callable[[str], list[str]] = _requires_of_installed,
            version: Callable[[str], str] = _version_of_installed,
            image: Mapping[str, str | None] = IMAGE_VERSIONS,
            env: Mapping[str, str] = TARGET_ENV) -> dict[str, Need]:
    """Every distribution that ``roots`` need on the image beyond what it holds (roots included), by name.

    A requirement is followed unless its marker is false on the target (Python 3.12, Linux x86_64, no extras) or
    the image holds its distribution at a version known to satisfy it. A requirement with a version bound on an
    image distribution whose version is not recorded is carried (and installed there only when needed).
    """
    required_by: dict[str, list[str]] = {}
    specs: dict[str, list[str]] = {}
    order: list[str] = []
    queue = [canonicalize_name(r) for r in roots]
    for r in queue:
        required_by.setdefault(r, ["etbench"])
        specs.setdefault(r, [""])
    seen: set[str] = set()
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        order.append(name)
        for line in requires(name):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(dict(env)):
                continue
            if _image_satisfies(req, image):
                continue
            dep = canonicalize_name(req.name)
            required_by.setdefault(dep, []).append(name)
            specs.setdefault(dep, []).append(str(req.specifier))
            if dep not in seen:
                queue.append(dep)
    return {n: Need(n, version(n), tuple(required_by[n]), tuple(specs[n]), n in image) for n in order}


# --- wheels -------------------------------------------------------------------------------------------------------
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_x86_64$")
_LEGACY = {"manylinux1_x86_64": 5, "manylinux2010_x86_64": 12, "manylinux2014_x86_64": 17}


def installs_on_target(filename: str) -> bool:
    """The wheel installs on CPython 3.12, Linux x86_64 with glibc ≤ 2.:data:`MAX_GLIBC_MINOR`."""
    _, _, _, tags = parse_wheel_filename(filename)
    for t in tags:
        interp_ok = t.interpreter in ("py3", "py312", "cp312") or (t.abi == "abi3" and t.interpreter.startswith("cp3")
                                                                    and int(t.interpreter[3:] or 0) <= 12)
        abi_ok = t.abi in ("none", "abi3", "cp312")
        if t.platform == "any":
            plat_ok = True
        else:
            m = _MANYLINUX.match(t.platform)
            minor = int(m.group(2)) if m and m.group(1) == "2" else _LEGACY.get(t.platform)
            plat_ok = minor is not None and minor <= MAX_GLIBC_MINOR
        if interp_ok and abi_ok and plat_ok:
            return True
    return False


def wheel_index(directory: Path) -> dict[str, list[Path]]:
    """Wheels in ``directory`` by canonical distribution name."""
    out: dict[str, list[Path]] = {}
    for w in sorted(Path(directory).glob("*.whl")):
        out.setdefault(canonicalize_name(parse_wheel_filename(w.name)[0]), []).append(w)
    return out


def compiled_members(wheel: Path) -> list[str]:
    """Compiled extension files inside a wheel (a pure wheel has none)."""
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if n.endswith((".so", ".pyd", ".dll", ".dylib"))]


def verify(directory: Path, needs: Mapping[str, Need]) -> dict[str, object]:
    """Check the bundle holds exactly one target-compatible wheel of each need, at its version; returns a summary.

    Raises :class:`BundleError` naming the file or distribution at fault.
    """
    index = wheel_index(directory)
    problems: list[str] = []
    for name, need in needs.items():
        found = index.get(name, [])
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} wheels in {directory} ({', '.join(p.name for p in found) or '-'}); "
                            f"need exactly one, version {need.version}")
            continue
        w = found[0]
        ver = str(parse_wheel_filename(w.name)[1])
        if Version(ver) != Version(need.version):
            problems.append(f"{w.name}: version {ver}, but the venv (what the tests ran) has {need.version}")
        if not installs_on_target(w.name):
            problems.append(f"{w.name}: no tag for CPython 3.12 on manylinux x86_64 (glibc <= 2.{MAX_GLIBC_MINOR})")
        if name in BUILD_FROM_SDIST and compiled_members(w):
            problems.append(f"{w.name}: expected a pure wheel (ops JIT-built there), has {compiled_members(w)[:3]}")
    extra = sorted(set(index) - set(needs))
    if extra:
        problems.append(f"{directory}: wheels outside the bundle's closure: {', '.join(extra)} (remove them)")
    if problems:
        raise BundleError("GPU bundle check failed:\n  " + "\n  ".join(problems))
    size_bytes = sum(p.stat().st_size for ps in index.values() for p in ps)
    size = size_bytes / 2**20
    if size > SIZE_TARGET_MIB:
        raise BundleError(f"GPU bundle {directory} is {size:.1f} MiB; it must stay under {SIZE_TARGET_MIB} MiB "
                          f"(device transfer limit {SIZE_LIMIT_MIB} MiB for the tree and carried paths together)")
    return {"directory": str(directory), "wheels": sorted(p.name for ps in index.values() for p in ps),
            "size_bytes": size_bytes, "size_mib": round(size, 2), "limit_mib": SIZE_LIMIT_MIB}


def download_command(pins: list[str], dest: Path) -> list[str]:
    """``pip download`` of binary wheels for the target, no dependency resolution (the closure is ours)."""
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *plats, "-d", str(dest),
            *pins]


def sdist_wheel_command(pin: str, dest: Path) -> list[str]:
    """Build a pure wheel from the sdist against this venv's torch (no build isolation)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-binary", ":all:",
            "--no-cache-dir", "-w", str(dest), pin]


def build(dest: Path, needs: Mapping[str, Need] | None = None) -> dict[str, object]:
    """Fetch the missing wheels into ``dest`` (kept ones are reused), drop stale ones, verify, return the summary."""
    import os

    needs = closure() if needs is None else needs
    dest.mkdir(parents=True, exist_ok=True)
    index = wheel_index(dest)
    for name, paths in index.items():  # stale: outside the closure, or another version than the venv's
        keep = name in needs and len(paths) == 1 and str(parse_wheel_filename(paths[0].name)[1]) == needs[name].version
        if not keep:
            for p in paths:
                print(f"gpu-bundle: removing {p.name} (not the venv's {needs[name].version if name in needs else '-'})")
                p.unlink()
    have = wheel_index(dest)
    binary = [n.pin for n in needs.values() if n.name not in BUILD_FROM_SDIST and n.name not in have]
    if binary:
        subprocess.run(download_command(binary, dest), check=True)
    for n in needs.values():
        if n.name in BUILD_FROM_SDIST and n.name not in have:
            env = {**os.environ, "DS_BUILD_OPS": "0"}
            subprocess.run(sdist_wheel_command(n.pin, dest), check=True, env=env)
    return verify(dest, needs)


# --- on the image -------------------------------------------------------------------------------------------------
def wheel_requirements(wheel: Path) -> list[str]:
    """``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def plan_install(wheels: Mapping[str, Path], installed: Callable[[str], str | None],
                 env: Mapping[str, str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """(wheels to install, {name: why skipped}) given the environment's ``installed(name)`` version (or None).

    A wheel is skipped when the environment already has its distribution at a version satisfying every bundled
    requirer's specifier; otherwise it is installed (shadowing the environment's copy on PYTHONPATH).
    """
    env = dict(env) if env is not None else default_environment() | {"extra": ""}
    specs: dict[str, list[Requirement]] = {}
    for w in wheels.values():
        for line in wheel_requirements(w):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                specs.setdefault(canonicalize_name(req.name), []).append(req)
    todo: list[Path] = []
    skipped: dict[str, str] = {}
    for name, w in sorted(wheels.items()):
        have = installed(name)
        if have is not None and all(r.specifier.contains(Version(have), prereleases=True) for r in specs.get(name, [])):
            skipped[name] = f"already installed {have}"
        else:
            todo.append(w)
    return todo, skipped


def _installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def install(directory: Path, target: Path) -> list[Path]:
    """Install the bundle's wheels the environment lacks into ``target`` (``pip --no-index --no-deps --target``)."""
    index = wheel_index(directory)
    doubles = {n: [p.name for p in ps] for n, ps in index.items() if len(ps) > 1}
    if doubles:
        raise BundleError(f"{directory} holds two versions of {doubles}; rebuild it with `make gpu-bundle`")
    todo, skipped = plan_install({n: ps[0] for n, ps in index.items()}, _installed_version)
    for name, why in skipped.items():
        print(f"gpu-bundle: {name}: {why}, not installed")
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
                        *map(str, todo)], check=True)
        print(f"gpu-bundle: installed {', '.join(p.name for p in todo)} into {target}")
    return todo


# --- the image's import set, simulated here -------------------------------------------------------------------
_BLOCKER = """\
# Written by etbench.cluster.gpu_bundle.write_blocker: modules of distributions the GPU image lacks are unimportable.
import json as _json, os as _os, sys as _sys


class _ImageImportSet:
    blocked = frozenset(_json.load(open({list_path!r})))
    log = {log_path!r}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in self.blocked:
            return None
        f = _sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith("<frozen"):
            f = f.f_back  # the first frame outside importlib: the importing line
        where = f"{{f.f_code.co_filename}}:{{f.f_lineno}}" if f is not None else "?"
        with open(self.log, "a") as out:
            out.write(f"{{name}} <- {{where}}\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image nor in its bundle)", name=name)


_sys.meta_path.insert(0, _ImageImportSet())
"""


def _installed_packages() -> Mapping[str, list[str]]:
    """Top-level module -> distributions on sys.path, leaving out the copies a library vendors and puts on sys.path
    when imported (setuptools adds its ``_vendor`` directory), so the answer does not depend on what this process
    happened to import before (torch.compile imports setuptools)."""
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if "_vendor" not in Path(p).parts]
    try:
        return md.packages_distributions()
    finally:
        sys.path[:] = saved


def blocked_modules(allowed: Iterable[str]) -> list[str]:
    """Top-level modules installed here whose distributions are all outside ``allowed`` (canonical names)."""
    ok = {canonicalize_name(a) for a in allowed} | {"etbench"}
    out = []
    for module, dists in _installed_packages().items():
        if module in sys.stdlib_module_names or module.startswith("__"):
            continue
        if not any(canonicalize_name(d) in ok for d in dists):
            out.append(module)
    return sorted(out)


def write_blocker(directory: Path, allowed: Iterable[str] | None = None) -> tuple[Path, Path]:
    """A ``sitecustomize.py`` in ``directory`` that blocks :func:`blocked_modules` in every Python started with
    ``directory`` on PYTHONPATH (children too), logging each blocked import; default ``allowed``: the image + bundle.

    Returns (sitecustomize path, log path). Put ``directory`` first on PYTHONPATH.
    """
    directory.mkdir(parents=True, exist_ok=True)
    allowed = [*IMAGE_VERSIONS, *closure()] if allowed is None else list(allowed)
    list_path, log_path = directory / "blocked_modules.json", directory / "blocked_imports.log"
    list_path.write_text(__import__("json").dumps(blocked_modules(allowed)))
    log_path.write_text("")
    site = directory / "sitecustomize.py"
    site.write_text(_BLOCKER.format(list_path=str(list_path), log_path=str(log_path)))
    return site, log_path


# Libraries that probe optional packages inside try/except: on the image those are absent, and that is fine.
# (urllib3 probes PySocks for requests' SOCKS proxies; a venv has it whenever some dependency pulls it in. DeepSpeed's
# autotuner cost model probes xgboost, which the venv has since etbench's XGBGraph baseline.)
OPTIONAL_PROBES = {"mlflow": "deepspeed/autotuning/autotuner.py", "socks": "urllib3/contrib/socks.py",
                   "xgboost": "deepspeed/autotuning/tuner/cost_model.py"}


def unexpected_imports(log_lines: Iterable[str]) -> list[str]:
    """Blocked imports (lines of the blocker's log) other than the known optional probes of :data:`OPTIONAL_PROBES`."""
    out = []
    for line in log_lines:
        name, _, where = line.partition(" <- ")
        probe = OPTIONAL_PROBES.get(name.partition(".")[0])
        if probe is None or probe not in where:
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m etbench.cluster.gpu_bundle", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", help="print the closure: what the image lacks, with the venv's versions")
    b = sub.add_parser("build", help="download / build the wheels into DEST and verify them")
    b.add_argument("--dest", type=Path, default=Path(".whl"))
    v = sub.add_parser("verify", help="verify DEST against the closure")
    v.add_argument("--dest", type=Path, default=Path(".whl"))
    i = sub.add_parser("install", help="(on the image) install the wheels it lacks into TARGET")
    i.add_argument("directory", type=Path)
    i.add_argument("target", type=Path)
    a = p.parse_args(argv)
    try:
        if a.cmd == "install":
            install(a.directory, a.target)
            return 0
        needs = closure()
        if a.cmd == "plan":
            for n in needs.values():
                why = ", ".join(f"{r} {s}".strip() for r, s in zip(n.required_by, n.specifiers, strict=True))
                print(f"{n.pin:32s} {'(if the image lacks it) ' if n.conditional else ''}required by {why}")
            return 0
        summary = build(a.dest, needs) if a.cmd == "build" else verify(a.dest, needs)
    except (BundleError, subprocess.CalledProcessError, md.PackageNotFoundError) as e:
        print(f"gpu-bundle: {e}", file=sys.stderr)
        return 1
    for w in summary["wheels"]:  # type: ignore[attr-defined]
        print(f"  {w}")
    print(f"gpu-bundle: {summary['directory']}: {len(summary['wheels'])} wheels, "  # type: ignore[arg-type]
          f"{summary['size_mib']} MiB (device transfer limit {SIZE_LIMIT_MIB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
