"""``etbench bench report``: the report and the sweep's dedup lookup on generated stores of 1,000 – 30,000 runs.

Per store size (each store generated once by ``etbench.testing.report_store`` and reused): ``etbench report`` cold
(fresh output and cache folder) and warm (again, same folders), the dedup lookup a sweep runs before it starts
(``etbench.tracking.lookup.runs_by_hash``; beside it, up to ``legacy_max_runs``, the search_runs paging it
replaced), ``etbench sweep plan`` of the store's grid, and — up to ``server_max_runs`` — the report through an
MLflow tracking server on 127.0.0.1 serving the same store (runs read page by page over REST, as on a cluster).
Every measurement runs in its own process (as a user runs it: imports included) and records its wall time and peak
RSS (``wait4``); the load average before and after each is recorded too — on a shared machine the times are only
as good as the load they ran under.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from etbench.testing.report_store import generate_store

TARGETS = {"report_cold_s": {5000: 20.0, 30000: 120.0}, "report_warm_s": {5000: 10.0}, "dedup_lookup_s": {5000: 2.0}}
_LOOKUP = """
import json, sys, time
t0 = time.perf_counter()
from etbench.tracking.lookup import runs_by_hash
t1, c1 = time.perf_counter(), time.process_time()
found = runs_by_hash(sys.argv[1], sys.argv[2])
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_s": t1 - t0, "lookup_s": t2 - t1, "lookup_cpu_s": c2 - c1, "hashes": len(found)}))
"""
_LEGACY = """
import json, sys, time
t0 = time.perf_counter()
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name(sys.argv[2])
t1, c1 = time.perf_counter(), time.process_time()
out, token = {}, None
while True:  # what the sweep runner did before etbench.tracking.lookup: every run, fully loaded
    page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
    for r in page:
        out.setdefault(r.data.tags.get("etbench.config_hash"), []).append(r)
    token = page.token
    if not token:
        break
print(json.dumps({"import_s": t1 - t0, "lookup_s": time.perf_counter() - t1, "lookup_cpu_s": time.process_time() - c1,
                  "hashes": len(out)}))
"""


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _peak_of(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float, float]:
    """Run ``cmd`` and return (result, wall s, its own peak RSS MiB, its CPU s) using os.wait4 on its pid."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    readers = [threading.Thread(target=lambda s=s, acc=acc: acc.append(s.read()), daemon=True)
               for s, acc in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    done = subprocess.CompletedProcess(cmd, proc.returncode, "".join(out_chunks), "".join(err_chunks))
    return done, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str]) -> dict[str, Any]:
    """``cmd`` in its own process: wall seconds, CPU seconds (user + system: what the wall time would be on an
    idle core, since the report is single-threaded), peak RSS (MiB, from wait4), load average before and after,
    and the JSON it printed last (the lookup probes)."""
    before = _load()
    done, wall, peak, cpu = _peak_of(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])}… exited {done.returncode}:\n{done.stderr[-3000:]}")
    out: dict[str, Any] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak, 1),
                           "loadavg_before": before, "loadavg_after": _load()}
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if last.startswith("{"):
        out.update({k: round(v, 3) if isinstance(v, float) else v for k, v in json.loads(last).items()})
    return out


STEPS = ("cold", "warm", "lookup", "plan", "server")
SERVER_START_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_cpu_s(pgid: int) -> float | None:
    """User + system CPU seconds of the live processes of process group ``pgid`` (from /proc; None elsewhere)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp, …, utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / tick


@contextmanager
def mlflow_server(backend_uri: str, log: Path) -> Iterator[tuple[str, float, int]]:
    """An ``mlflow server`` on 127.0.0.1 (one worker, no job runner) over ``backend_uri``: yields (its URI, seconds
    until /health answered, its process group). It runs in a session of its own and is stopped by that process
    group (SIGTERM, then SIGKILL after 30 s): exactly the processes this call started."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering; "
                                   f"{log}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > SERVER_START_TIMEOUT_S:
                raise RuntimeError(f"mlflow server did not answer {url}/health within {SERVER_START_TIMEOUT_S:.0f} s; "
                                   f"{log}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield url, round(time.perf_counter() - t0, 2), proc.pid
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group ``proc`` leads (its own session), SIGKILL it if still there after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def bench_size(size: int, stores: Path, work: Path, *, legacy: bool, progress: Callable[[str], None],
               skip: frozenset[str] = frozenset(), server: bool = False) -> dict[str, Any]:
    """Every measurement (``STEPS`` but those in ``skip``; "server" only with ``server``) on the store of ``size``
    runs (generated when absent)."""
    info = generate_store(stores / str(size), size, progress=progress)
    row: dict[str, Any] = {"runs": info["runs"], "store": str(stores / str(size)),
                           "generate_s": info["generate_s"], "store_reused": info["reused"]}
    uri, exp = info["tracking_uri"], info["experiment"]
    out = work / f"report-{size}"
    shutil.rmtree(out, ignore_errors=True)
    report = [sys.executable, "-m", "etbench.cli", "report", "--experiment", exp, "--tracking-uri", uri,
              "--out", str(out)]
    if "cold" not in skip:
        progress(f"[bench report] {size} runs: report cold")
        row["report_cold"] = run_measured(report)
    if "warm" not in skip:
        progress(f"[bench report] {size} runs: report warm")
        row["report_warm"] = run_measured(report)
    if (out / "README.md").exists():
        readme = (out / "README.md").read_text()
        row["report_files"] = {"figures": len(list((out / "figures").glob("*.pdf"))),
                               "tables": len(list((out / "tables").glob("*.tex"))),
                               "layout_warnings": readme.count("\n- figure ")}
    if "lookup" not in skip:
        progress(f"[bench report] {size} runs: dedup lookup")
        row["dedup_lookup"] = run_measured([sys.executable, "-c", _LOOKUP, uri, exp])
        if legacy:
            row["dedup_lookup_search_runs"] = run_measured([sys.executable, "-c", _LEGACY, uri, exp])
            row["dedup_speedup"] = round(row["dedup_lookup_search_runs"]["lookup_s"] /
                                         max(row["dedup_lookup"]["lookup_s"], 1e-6), 1)
    if "plan" not in skip:
        progress(f"[bench report] {size} runs: sweep plan")
        row["sweep_plan"] = run_measured([sys.executable, "-m", "etbench.cli", "sweep", "plan", info["grid"]])
    if server and "server" not in skip:
        progress(f"[bench report] {size} runs: report through an MLflow server on 127.0.0.1 (cold, warm)")
        served = work / f"report-{size}-server"
        shutil.rmtree(served, ignore_errors=True)
        with mlflow_server(uri, work / f"mlflow-server-{size}.log") as (url, start_s, pgid):
            cmd = [*report[:report.index("--tracking-uri") + 1], url, "--out", str(served)]

            def measured() -> dict[str, Any]:  # the report's process, plus what the server spent serving it
                before = group_cpu_s(pgid)
                m = run_measured(cmd)
                after = group_cpu_s(pgid)
                if before is not None and after is not None:
                    m["server_cpu_s"] = round(after - before, 2)
                return m

            row["server"] = {"start_s": start_s, "report_cold": measured(), "report_warm": measured()}
    return row


def run_report_bench(out: Path, sizes: tuple[int, ...] = (1000, 5000, 30000),
                     stores: Path = Path("results/bench_report_stores"), legacy_max_runs: int = 5000,
                     skip: frozenset[str] = frozenset(), progress: Callable[[str], None] = print,
                     server_max_runs: int = 1000) -> dict[str, Any]:
    """Measure every size in ``sizes`` (ascending) and write ``out/bench_report.json``; what an earlier call into
    the same ``out`` measured stays in the JSON (each with its own load averages) unless measured again. The
    MLflow-server report runs for sizes up to ``server_max_runs``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "bench_report.json"
    earlier = json.loads(previous.read_text()).get("sizes", {}) if previous.exists() else {}
    report: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                                          "uptime_before": _uptime(), "loadavg_before": _load()},
                              "note": "each figure ran in its own process on a machine shared with other jobs; "
                                      "loadavg_before/after say how busy it was; cpu_s (user + system of that "
                                      "process) is what wall_s would be on an idle core", "sizes": earlier}
    for size in sorted(sizes):
        row = bench_size(size, Path(stores), out / "bench_report_work", legacy=size <= legacy_max_runs,
                         progress=progress, skip=skip, server=size <= server_max_runs)
        report["sizes"].setdefault(str(size), {}).update(row)  # measurements skipped now keep earlier values
        report["sizes"] = dict(sorted(report["sizes"].items(), key=lambda kv: int(kv[0])))
        _write(out, report)
    report["machine"]["uptime_after"] = _uptime()
    report["targets"] = _targets(report["sizes"])
    report["memory"] = _memory(report["sizes"])
    _write(out, report)
    return report


def _targets(sizes: dict[str, Any]) -> dict[str, Any]:
    """Each target against the wall time and against the CPU time (the wall time of an idle machine)."""
    got = {"report_cold_s": lambda r: r.get("report_cold"), "report_warm_s": lambda r: r.get("report_warm"),
           "dedup_lookup_s": lambda r: ({"wall_s": r["dedup_lookup"]["lookup_s"],
                                         "cpu_s": r["dedup_lookup"].get("lookup_cpu_s")}
                                        if "dedup_lookup" in r else None)}
    out: dict[str, Any] = {}
    for name, per_size in TARGETS.items():
        for size, limit in per_size.items():
            m = got[name](sizes[str(size)]) if str(size) in sizes else None
            if m is not None:
                out[f"{name}@{size}"] = {"wall_s": m["wall_s"], "cpu_s": m["cpu_s"], "target_s": limit,
                                         "met_wall": m["wall_s"] <= limit,
                                         "met_cpu": None if m["cpu_s"] is None else m["cpu_s"] <= limit}
    return out


def _memory(sizes: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of the cold report per size and the MiB per 1,000 runs between consecutive sizes (linearity)."""
    points = sorted((int(k), v["report_cold"]["peak_rss_mib"]) for k, v in sizes.items() if "report_cold" in v)
    slopes = [round((b[1] - a[1]) / (b[0] - a[0]) * 1000, 1) for a, b in itertools.pairwise(points)]
    return {"cold_peak_rss_mib": dict(points), "mib_per_1000_runs_between_sizes": slopes}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return f"loadavg {_load()}"


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "bench_report.json").write_text(json.dumps(report, indent=2, default=str))
