"""A sweep's console shows etbench's own progress; Tune's/Ray's/MLflow's chatter lands in the grid's library log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GRID = """\
name: quiet
base:
  task: {kind: image, dataset: digits, limit_train: 64, limit_eval: 32}
  train: {epochs: 1, batch_size: 32}
models: [et]
seeds: [0]
resources: {workers: 1, cpus_per_worker: 1}
max_concurrent_trials: 1
"""
# what the libraries print on their own, each with where it comes from
NOISE = {
    "Configuration for experiment": "Tune's experiment box (printed even at verbose=0)",
    "To visualize your results with TensorBoard": "Tune's TensorBoard hint",
    "View detailed results here": "Tune's results path",
    "Creating initial MLflow database tables": "MLflow's new-store INFO line",
    "Running upgrade": "alembic's migration INFO lines",
    "Started a local Ray instance": "Ray's INFO line",
}


@pytest.mark.slow
def test_sweep_console_is_etbench_only_and_the_log_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "quiet.yaml").write_text(GRID)
    out = subprocess.run([sys.executable, "-m", "etbench", "sweep", "run", "quiet.yaml", "--results", "res"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=420, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    console = out.stdout + out.stderr
    log = tmp_path / "res" / "quiet" / "logs" / "library.log"
    assert [ln for ln in out.stdout.splitlines() if "library logs" in ln] == \
        [f"grid quiet: library logs (Ray Tune, MLflow) → {log}"]  # the path, printed once
    assert "[1/1 done · 0 running · 0 left] FINISHED et seed=0" in out.stdout
    assert "grid quiet: 1 finished, 0 failed" in out.stdout
    assert "viewStateShareKey=etbench" in out.stdout  # the MLflow UI link
    leaked = {k: why for k, why in NOISE.items() if k in console}
    assert not leaked, f"library output on the console: {leaked}"
    kept = log.read_text()
    missing = {k: why for k, why in NOISE.items() if k not in kept}
    assert not missing, f"not in {log}: {missing}"
