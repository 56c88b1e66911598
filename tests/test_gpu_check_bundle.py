"""The GPU bundle (``make gpu-bundle``): its closure over the bare image, wheel checks, and the install plan there.

Offline: the closure is walked over this venv's installed metadata; wheels are fabricated; the import-set test runs
``import pydantic, deepspeed`` with every distribution outside (image + closure) made unimportable.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from etbench.cluster import gpu_bundle as gb

REPO = Path(__file__).resolve().parents[1]


def _wheel(directory: Path, filename: str, requires: list[str] = (), extra_files: tuple[str, ...] = ()) -> Path:
    """A minimal wheel: METADATA with ``Requires-Dist`` lines (+ optional members)."""
    name, version = filename.split("-")[:2]
    path = directory / filename
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        for f in extra_files:
            z.writestr(f, b"\0")
    return path


def test_closure_of_this_venv_is_what_the_image_lacks() -> None:
    needs = gb.closure()
    assert set(needs) == {"deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                          "typing-extensions", "hjson", "packaging"}
    for n in needs.values():
        assert n.version == md.version(n.name)  # the versions the test suite runs with
    # image distributions are carried only because a version bound cannot be checked against the image's list
    assert {n.name for n in needs.values() if n.conditional} == {"typing-extensions", "packaging"}
    assert needs["pydantic-core"].specifiers == (f"=={md.version('pydantic-core')}",)
    # deepspeed's other needs (torch, numpy, ninja, psutil, py-cpuinfo, msgpack, einops, tqdm) are on the image
    assert "torch" not in needs and "ninja" not in needs and "py-cpuinfo" not in needs


def test_closure_follows_markers_versions_and_cycles() -> None:
    graph = {
        "app": ["lib>=1", "old-on-image>=2", "new-on-image>=1", "unknown-on-image>=1", "plain-on-image",
                "win-only; sys_platform == 'win32'", "py311-only; python_version < '3.12'",
                "dev-tool; extra == 'dev'", "py312-only; python_version >= '3.12'"],
        "lib": ["app", "leaf"],  # a cycle back to the root
        "leaf": [], "old-on-image": [], "unknown-on-image": [], "py312-only": [],
    }
    image = {"old-on-image": "1.5", "new-on-image": "3.0", "unknown-on-image": None, "plain-on-image": None}
    needs = gb.closure(["app"], requires=lambda n: graph[n], version=lambda n: "9.9", image=image)
    assert list(needs) == ["app", "lib", "old-on-image", "unknown-on-image", "py312-only", "leaf"]
    assert needs["old-on-image"].conditional and needs["unknown-on-image"].conditional
    assert not needs["lib"].conditional
    assert needs["lib"].required_by == ("app",) and needs["app"].required_by == ("etbench", "lib")


@pytest.mark.parametrize("filename, ok", [
    ("pydantic-2.14.4-py3-none-any.whl", True),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", False),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl", False),
    ("pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("x-1.0-cp39-abi3-manylinux_2_28_x86_64.whl", True),
    ("x-1.0-cp312-cp312-manylinux_2_40_x86_64.whl", False),
    ("x-1.0-cp312-cp312-musllinux_1_2_x86_64.whl", False),
])
def test_wheel_tags_for_the_image(filename: str, ok: bool) -> None:
    assert gb.installs_on_target(filename) is ok


def _needs() -> dict[str, gb.Need]:
    return {"deepspeed": gb.Need("deepspeed", "0.19.8", ("etbench",), ("",)),
            "hjson": gb.Need("hjson", "3.1.0", ("deepspeed",), ("",))}


def test_verify_accepts_a_complete_bundle_and_names_every_fault(tmp_path: Path) -> None:
    _wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", ["hjson"], ("deepspeed/__init__.py",))
    _wheel(tmp_path, "hjson-3.1.0-py3-none-any.whl")
    summary = gb.verify(tmp_path, _needs())
    assert summary["wheels"] == ["deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl"]
    assert summary["size_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.whl"))

    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "deepspeed-0.19.8-py3-none-any.whl", [], ("deepspeed/ops/fused_adam.so",))
    _wheel(bad, "hjson-3.0.0-py3-none-any.whl")
    _wheel(bad, "stray-1.0-py3-none-any.whl")
    with pytest.raises(gb.BundleError) as err:
        gb.verify(bad, _needs())
    msg = str(err.value)
    assert "expected a pure wheel" in msg and "fused_adam.so" in msg
    assert "hjson-3.0.0-py3-none-any.whl: version 3.0.0, but the venv (what the tests ran) has 3.1.0" in msg
    assert "outside the bundle's closure: stray" in msg

    doubles = tmp_path / "doubles"
    doubles.mkdir()
    _wheel(doubles, "hjson-3.1.0-py3-none-any.whl")
    _wheel(doubles, "hjson-3.0.0-py3-none-any.whl")
    _wheel(doubles, "deepspeed-0.19.8-cp311-cp311-manylinux_2_17_x86_64.whl")
    with pytest.raises(gb.BundleError, match="hjson: 2 wheels") as err:
        gb.verify(doubles, _needs())
    assert "no tag for CPython 3.12" in str(err.value)


def test_install_plan_skips_what_the_image_already_satisfies(tmp_path: Path) -> None:
    wheels = {
        "pydantic": _wheel(tmp_path, "pydantic-2.14.4-py3-none-any.whl", ["typing-extensions>=4.16.0",
                           "annotated-types>=0.6.0", "email-validator; extra == 'email'"]),
        "deepspeed": _wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", ["packaging>=20.0"]),
        "typing-extensions": _wheel(tmp_path, "typing_extensions-4.16.0-py3-none-any.whl"),
        "packaging": _wheel(tmp_path, "packaging-26.4-py3-none-any.whl"),
        "annotated-types": _wheel(tmp_path, "annotated_types-0.8.0-py3-none-any.whl"),
    }
    image = {"typing-extensions": "4.15.0", "packaging": "24.2", "annotated-types": None}
    todo, skipped = gb.plan_install(wheels, image.get)
    assert sorted(p.name for p in todo) == ["annotated_types-0.8.0-py3-none-any.whl",
                                            "deepspeed-0.19.8-py3-none-any.whl", "pydantic-2.14.4-py3-none-any.whl",
                                            "typing_extensions-4.16.0-py3-none-any.whl"]  # 4.15 is too old
    assert skipped == {"packaging": "already installed 24.2"}
    todo, skipped = gb.plan_install(wheels, {**image, "typing-extensions": "4.17.1"}.get)
    assert "typing-extensions" in skipped


def test_download_and_build_commands_fetch_exactly_the_pins(tmp_path: Path) -> None:
    cmd = gb.download_command(["hjson==3.1.0"], tmp_path)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert "manylinux2014_x86_64" in cmd and cmd[-1] == "hjson==3.1.0"
    wheel = gb.sdist_wheel_command("deepspeed==0.19.8", tmp_path)
    assert "--no-build-isolation" in wheel and "--no-deps" in wheel and wheel[-1] == "deepspeed==0.19.8"


def _run_with_image_imports(code: str, tmp_path: Path, allowed: list[str] | None = None,
                            ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    _, log = gb.write_blocker(tmp_path / "blocker", allowed)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'blocker'}{os.pathsep}{REPO}", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    return proc, log.read_text().splitlines()


def test_bundle_closure_covers_the_gpu_checks_imports(tmp_path: Path) -> None:
    code = ("import pydantic, deepspeed, deepspeed.runtime.engine, deepspeed.ops.adam\n"
            "import etbench.config, etbench.engine.ds_backend, etbench.engine.build, etbench.bench.gpu_check\n"
            "import etbench.bench.gpu_train, etbench.bench.core, etbench.models.baselines.vit\n"
            "print('imported', deepspeed.__version__)")
    proc, attempts = _run_with_image_imports(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout
    assert gb.unexpected_imports(attempts) == [], attempts
    blocked = json.loads((tmp_path / "blocker" / "blocked_modules.json").read_text())
    assert {"ray", "mlflow"} <= set(blocked) and "pydantic" not in blocked and "torch" not in blocked


def test_blocker_bites_without_a_bundled_distribution(tmp_path: Path) -> None:
    allowed = [n for n in [*gb.IMAGE_VERSIONS, *gb.closure()] if n != "hjson"]
    proc, attempts = _run_with_image_imports("import deepspeed", tmp_path, allowed)
    assert proc.returncode != 0 and "No module named 'hjson' (not on the GPU image nor in its bundle)" in proc.stderr
    assert attempts and attempts[0].startswith("hjson <- ")
    assert gb.unexpected_imports(["mlflow <- /x/deepspeed/autotuning/autotuner.py:31", "mlflow <- /r/etbench/a.py:3"]) \
        == ["mlflow <- /r/etbench/a.py:3"]  # DeepSpeed's optional probe is fine, etbench needing mlflow is not
    assert gb.unexpected_imports(["xgboost <- /x/deepspeed/autotuning/tuner/cost_model.py:9",
                                  "xgboost <- /r/etbench/models/baselines/xgbgraph.py:40"]) \
        == ["xgboost <- /r/etbench/models/baselines/xgbgraph.py:40"]


def test_blocked_set_ignores_vendored_copies_a_library_put_on_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # importing setuptools (torch.compile does) puts setuptools/_vendor on sys.path: its vendored jaraco /
    # more_itertools must not join the blocked set, or a child that imports setuptools fails the import check
    import setuptools

    allowed = [*gb.IMAGE_VERSIONS, *gb.closure()]
    vendor = Path(setuptools.__file__).parent / "_vendor"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "_vendor" not in Path(p).parts])
    baseline = gb.blocked_modules(allowed)
    monkeypatch.syspath_prepend(str(vendor))
    assert gb.blocked_modules(allowed) == baseline
    assert str(vendor) in sys.path  # the caller's sys.path is left as it was


def test_built_bundle_verifies() -> None:
    """After ``make gpu-bundle``: one target wheel per need at the venv's version, far under the transfer limit."""
    if not (REPO / ".whl").is_dir():
        pytest.skip("no .whl/ here (run `make gpu-bundle` to build it; it downloads)")
    summary = gb.verify(REPO / ".whl", gb.closure())
    assert summary["size_mib"] < gb.SIZE_TARGET_MIB
