"""The MLflow UI opens an etbench experiment on its runs table (not MLflow 3's GenAI overview), in a real browser,
with a grid as one collapsible row: its parent run, whose trial runs show when the row is expanded (issue 28.2).

The store is written by etbench's own tracking code (``RunTracker``); ``mlflow ui`` serves it on 127.0.0.1; headless
Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium) opens the link etbench prints. Only the
browser test is skipped, with the reason, where Chromium or its driver is missing; ``make test`` tries to install
them first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from etbench.config import resolve_run_config
from etbench.tracking import schema as S
from etbench.tracking.grid_run import close_grid_run, grid_key, open_grid_run
from etbench.tracking.mlflow_log import RunTracker
from etbench.tracking.ui import EXPERIMENT_KIND_TAG, MODEL_TRAINING, VIEW_TAG, publish_runs_view, runs_page_url, ui_hint

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ETBENCH_TEST_ARTIFACTS", REPO / "results" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RUN_NAMES = ("et-digits-seed0", "vit-digits-seed1")
GRID_ROW = "grid ui-grid"  # the parent run's name (etbench.tracking.grid_run)
# what MLflow 3's GenAI experiment overview shows, and its runs table never does
GENAI_MARKERS = ("Token Usage", "Detect Issues", "Tokens per Trace")


def _store(tmp_path: Path, experiment: str = "ui-grid") -> tuple[str, str]:
    """Two finished runs with names, per-epoch metrics and a summary, written by etbench's tracker, children of
    their grid's parent run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = None
    parent = open_grid_run(uri, experiment, grid=experiment, key=grid_key(experiment, experiment, str(tmp_path)),
                           storage=str(tmp_path), artifact_root=tmp_path / "artifacts")
    for i, name in enumerate(RUN_NAMES):
        cfg = resolve_run_config({"task": {"kind": "image", "dataset": "digits"}, "train": {"seed": i}})
        tracker = RunTracker(uri, experiment, name, tmp_path / "artifacts")
        tracker.start(cfg, grid=experiment, extra_tags={S.TAG_PARENT_RUN: parent})
        for e in range(2):
            tracker.log_epoch(e, {"train/loss": 1.0 / (e + 1), "val/mse_masked": 0.3 - 0.1 * e - 0.01 * i})
        tracker.log_summary({"best": {"val/mse_masked": 0.2 - 0.01 * i, "test/mse_masked": 0.21 - 0.01 * i},
                             "best_epoch": 2, "energy": {"rise_fraction": 0.0, "E": [1.0, 0.5]}})
        tracker.finish()
    close_grid_run(uri, parent, "FINISHED")
    assert tracker is not None
    return uri, tracker.experiment_id


def test_experiments_are_model_training_with_a_metric_view(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri, exp_id = _store(tmp_path)
    client = MlflowClient(uri)
    tags = client.get_experiment(exp_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    view = json.loads(tags[VIEW_TAG])
    assert view["selectedColumns"] == ["metrics.`best/test/mse_masked`", "metrics.`best/val/mse_masked`",
                                       "metrics.`energy/rise_fraction`"]
    # newest first: the only order in which MLflow's UI nests a grid's trial runs under its parent run
    assert view["orderByKey"] == "attributes.start_time" and view["orderByAsc"] is False
    old = {**view, "orderByKey": "metrics.`best/val/mse_masked`", "orderByAsc": True}  # the view before issue 28.2
    client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(old))
    publish_runs_view(client, exp_id, ["best/val/mse_masked"])  # (as each finished run does) … is re-sorted
    assert json.loads(client.get_experiment(exp_id).tags[VIEW_TAG])["orderByKey"] == "attributes.start_time"
    # an experiment made elsewhere, without the tag, gets it when etbench logs into it; an explicit choice stays
    # (a tracker resolves its experiment on first use, not when built: issue 23's outage handling)
    old = client.create_experiment("made-by-hand")
    assert RunTracker(uri, "made-by-hand", "r").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert RunTracker(uri, "chosen", "r").experiment_id == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    hint = ui_hint(uri, "ui-grid")
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in hint and runs_page_url(exp_id) in hint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow ui did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _browser(profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=2400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))


def test_mlflow_ui_opens_the_runs_table_in_chromium(tmp_path: Path, record_property) -> None:  # type: ignore[no-untyped-def]
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium or ChromeDriver not installed (Debian packages chromium, chromium-driver; "
                    "`make test` tries `apt-get install -y chromium chromium-driver`)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    from selenium.webdriver.support.ui import WebDriverWait

    uri, exp_id = _store(tmp_path)
    port, log = _free_port(), tmp_path / "mlflow_ui.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", server, log)
        driver = _browser(tmp_path / "chromium-profile")
        try:
            driver.get(runs_page_url(exp_id, base))

            def table_text(d) -> str:  # type: ignore[no-untyped-def]
                headers = " ".join(e.text for e in d.find_elements("css selector", "[role=columnheader]"))
                return f"{headers}\n{d.find_element('tag name', 'body').text}"

            def folded_grid(d):  # type: ignore[no-untyped-def]
                """The table with its metric columns and the grid's row, folded: (its text, the row's expander)."""
                text = table_text(d)
                toggles = d.find_elements("css selector", "button[data-component-id*='runnamecellrenderer']")
                return (text, toggles[0]) if GRID_ROW in text and "best/val/mse_masked" in text and toggles else False

            try:
                folded, toggle = WebDriverWait(driver, 90, 0.5).until(folded_grid)
                assert not [n for n in RUN_NAMES if n in folded], f"trial runs not folded under the grid:\n{folded}"
                toggle.click()  # one click unfolds the grid's trial runs
                text = WebDriverWait(driver, 30, 0.5).until(
                    lambda d: table_text(d) if all(n in table_text(d) for n in RUN_NAMES) else False)
            finally:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / "mlflow_ui_runs.png"
                driver.save_screenshot(str(shot))
                record_property("screenshot", str(shot))
                print(f"screenshot: {shot}")
            assert "/runs" in driver.current_url and "workflowType=machine_learning" in driver.current_url
            assert "Run Name" in text and "Metrics" in text
            for column in ("best/val/mse_masked", "best/test/mse_masked", "energy/rise_fraction"):
                assert column in text
            assert GRID_ROW in text and "3 matching runs" in text  # the grid's parent and its 2 trial runs
            assert not [m for m in GENAI_MARKERS if m in text], "GenAI overview shown instead of the runs table"
        finally:
            driver.quit()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
