"""The CLI's error boundary (one clean ``error:`` line, exit 2, traceback only with --debug); ``python -m etbench``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from etbench.cli import main
from etbench.data import DatasetError
from etbench.errors import EtbenchError, user_error

REPO = Path(__file__).resolve().parents[1]


def _etbench(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "etbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


def test_python_m_etbench_is_the_cli(tmp_path: Path) -> None:
    out = _etbench(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: etbench") and "--debug" in out.stdout and "quickstart" in out.stdout


def test_missing_dataset_root_is_one_clean_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["train", "image", "--dataset", "mnist", "--root", "/nonexistent", "--epochs", "1"]
    out = _etbench(args, tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    (line,) = _error_lines(out.stderr)
    assert "MNIST root /nonexistent does not exist" in line
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())
    dbg = _etbench(["--debug", *args], tmp_path)
    assert dbg.returncode == 2 and "Traceback (most recent call last)" in dbg.stderr
    assert "etbench.data.DatasetError: MNIST root /nonexistent" in dbg.stderr and len(_error_lines(dbg.stderr)) == 1


def test_corrupt_graph_file_is_one_clean_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive" * 8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ETBENCH_DEBUG", raising=False)
    args = ["train", "graph", "--dataset", "tolokers", "--path", str(bad), "--epochs", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert str(bad) in line and "not a readable .npz archive" in line
    monkeypatch.setenv("ETBENCH_DEBUG", "1")  # the environment variable works like --debug
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DatasetError" in err and len(_error_lines(err)) == 1


@pytest.mark.parametrize("args, expected", [
    (["sweep", "run", "no-such-grid.yaml"], "grid file not found: no-such-grid.yaml"),
    (["sweep", "run", "GRID", "--address", "ray://127.0.0.1:10001"], "Ray Client (ray://) is not supported"),
    (["train", "image", "--model", "no-such-model", "--epochs", "1"], "no-such-model"),
    (["train", "graph", "--path", "x.npz", "--epochs", "1"], "the synthetic graph is generated"),
    (["report", "--experiment", "e", "--tracking-uri", "bogus://x", "--out", "rep"], "unsupported URI 'bogus://x'"),
    (["inpaint", "no-such.npz", "in.png", "out.png"], "no-such.npz"),
    (["report", "--experiment", "nope", "--tracking-uri", "sqlite:///store.db", "--out", "rep"],
     "MLflow experiment 'nope' not found"),
])
def test_user_errors_print_one_line_and_exit_2(args: list[str], expected: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ETBENCH_DEBUG", raising=False)
    (tmp_path / "GRID").write_text((REPO / "experiments" / "quickstart.yaml").read_text())
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert expected in "\n".join(_error_lines(err)) or expected in err, err


def test_bugs_keep_their_traceback_and_wrapped_user_errors_are_found() -> None:
    data = DatasetError("no file at /x")
    assert user_error(data) is data
    try:
        raise RuntimeError("worker failed") from data
    except RuntimeError as wrapped:
        assert user_error(wrapped) is data

    class WorkerGroupError(Exception):  # the shape of Ray Train's: failures by worker rank
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("training failed")
            self.worker_failures = failures

    assert user_error(WorkerGroupError({0: data})) is data
    assert user_error(FileNotFoundError(2, "No such file", "/x")) is not None
    assert user_error(ValueError("a bug")) is None
    try:  # a bug raised while handling a user error stays a bug (implicit context is not followed)
        try:
            raise data
        except DatasetError:
            raise KeyError("bug")  # noqa: B904
    except KeyError as bug:
        assert user_error(bug) is None
    assert issubclass(DatasetError, EtbenchError) and issubclass(DatasetError, ValueError)
