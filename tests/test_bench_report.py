"""``etbench bench report`` end to end on a 24-run generated store: every measurement runs and lands in the JSON
with its wall and CPU time, peak RSS and load averages, the report files are counted, a second call keeps what it
skips, and the MLflow-server step stops the server it started."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from etbench import cli
from etbench.bench import report as bench

SIZE = 24


def _measured(m: dict) -> None:
    """One measurement: positive wall/CPU seconds and peak RSS, load averages before and after."""
    assert m["wall_s"] > 0 and m["cpu_s"] > 0 and m["peak_rss_mib"] > 50, m
    assert len(m["loadavg_before"]) == len(m["loadavg_after"]) == 3, m


def test_bench_report_cli_writes_every_measurement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    servers: list[int] = []
    real_popen = bench.subprocess.Popen

    def recording_popen(cmd, *args, **kwargs):  # type: ignore[no-untyped-def]
        proc = real_popen(cmd, *args, **kwargs)
        if "server" in cmd:
            servers.append(proc.pid)
        return proc

    monkeypatch.setattr(bench.subprocess, "Popen", recording_popen)
    out, stores = tmp_path / "bench", tmp_path / "stores"
    argv = ["bench", "report", "--out", str(out), "--sizes", str(SIZE), "--stores", str(stores),
            "--legacy-max", str(SIZE), "--server-max", str(SIZE)]
    assert cli.main(argv) == 0
    doc = json.loads((out / "bench_report.json").read_text())
    assert doc["machine"]["cpu_count"] >= 1 and "load average" in doc["machine"]["uptime_before"]
    row = doc["sizes"][str(SIZE)]
    assert row["runs"] == SIZE and row["generate_s"] > 0 and row["store_reused"] is False
    store = json.loads((stores / str(SIZE) / "store.json").read_text())
    assert store["runs"] == SIZE and row["store"] == str(stores / str(SIZE))
    for key in ("report_cold", "report_warm", "dedup_lookup", "dedup_lookup_search_runs", "sweep_plan"):
        _measured(row[key])
    assert row["dedup_lookup"]["hashes"] == row["dedup_lookup_search_runs"]["hashes"] == SIZE
    assert row["dedup_lookup"]["lookup_s"] > 0 and row["dedup_speedup"] > 0
    figures = sorted((out / "bench_report_work" / f"report-{SIZE}" / "figures").glob("*.pdf"))
    tables = sorted((out / "bench_report_work" / f"report-{SIZE}" / "tables").glob("*.tex"))
    assert row["report_files"] == {"figures": len(figures), "tables": len(tables), "layout_warnings": 0}
    assert len(figures) >= 3 and len(tables) >= 2
    served = row["server"]
    assert served["start_s"] > 0
    for key in ("report_cold", "report_warm"):
        _measured(served[key])
        assert served[key]["server_cpu_s"] > 0  # the server's own processes worked for the report
    over_rest = sorted(p.name for p in (out / "bench_report_work" / f"report-{SIZE}-server" / "figures").glob("*.pdf"))
    assert over_rest == [p.name for p in figures]  # the server's report holds the same figures
    assert doc["memory"]["cold_peak_rss_mib"] == {str(SIZE): row["report_cold"]["peak_rss_mib"]}
    assert doc["targets"] == {}  # targets exist for 5,000 and 30,000 runs only
    assert len(servers) == 1 and not psutil.pid_exists(servers[0])  # the server it started is gone

    # again, measuring only the lookup: the store is reused and the other measurements stay as they were
    assert cli.main([*argv, "--skip", "cold", "warm", "plan", "server"]) == 0
    again = json.loads((out / "bench_report.json").read_text())["sizes"][str(SIZE)]
    assert again["store_reused"] is True and again["report_cold"] == row["report_cold"]
    assert again["server"] == row["server"] and again["dedup_lookup"] != row["dedup_lookup"]


def test_unknown_store_size_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no generated-store shape with 7 runs; available: \[24, 200, 1000"):
        bench.run_report_bench(tmp_path, sizes=(7,), stores=tmp_path / "stores", progress=lambda s: None)
