"""``etbench bench chaos``: a plain and a tuned grid on a loopback cluster, once fault-free and once under a seeded
schedule of random faults (issue 23).

The cluster is :mod:`etbench.testing.loopback_cluster` (root and ``unshare`` needed): a head and a worker node in
its own mount namespace sharing only ``shared/``, MLflow behind a proxy. Faults, drawn with
``random.Random(seed)`` at exponential intervals while a grid runs, each hitting a trial mid-run:

- ``node``: the worker node SIGKILLed, started again 10 s later (Ray Tune retries its trials);
- ``driver``: the sweep driver SIGKILLed and the grid re-submitted with ``--resume``;
- ``tracking``: the tracking server black-holed for ``blackhole_s`` seconds, then restarted on the same store.

Reported (JSON, and the table in ``docs/chaos.md``): faults injected by kind, runs lost (a planned config hash
without a FINISHED run: must be 0), runs duplicated (0), runs left RUNNING (0), trials that ran more than once,
attempts, every problem :func:`etbench.testing.chaos.audit` found, for the tuned grid whether each search kept its
budget and selected the same configuration as the fault-free search, and the wall-time overhead against the
fault-free run measured on the same cluster in the same call. Epochs re-trained are bounded, not counted: with a
checkpoint every epoch an interrupted attempt loses at most the epoch it was in, so re-trained epochs ≤ attempts −
trials.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import yaml

from etbench.bench.common import machine_info
from etbench.testing.chaos import audit, trial_progress
from etbench.testing.loopback_cluster import LoopbackCluster, loopback_cluster

KINDS = ("node", "driver", "tracking")


def plain_grid(name: str, trials: int, epochs: int) -> dict[str, Any]:
    """``trials`` one-worker ET trials on digits (steps × seeds), every one checkpointing each epoch."""
    steps = [1, 2, 3, 4]
    seeds = list(range(max(1, -(-trials // len(steps)))))
    return {"name": name, "models": ["et"], "seeds": seeds, "max_concurrent_trials": 3,
            "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 1024, "limit_eval": 32},
                     "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "eval_trace_samples": 2,
                               "checkpoint_every": 1}},
            "axes": {"model.et.steps": steps},
            "resources": {"workers": 1, "cpus_per_worker": 1.0}}


def tuned_grid(name: str, epochs: int, configurations: int) -> dict[str, Any]:
    """An equal-budget random search for the ET and a ViT (no early stopping: selection must not depend on when
    a fault lands), then two final seeds each."""
    lr = {"distribution": "loguniform", "low": 1e-3, "high": 0.03}
    return {"name": name, "models": ["et", "vit"], "seeds": [0, 1], "max_concurrent_trials": 3,
            "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": 512, "limit_eval": 32},
                     "train": {"epochs": epochs, "batch_size": 64, "eval_trace_samples": 2, "checkpoint_every": 1},
                     "model": {"et": {"steps": 2}}},
            "resources": {"workers": 1, "cpus_per_worker": 1.0},
            "tuning": {"algorithm": "random", "search_seed": 3, "scheduler": {"kind": "none"},
                       "budget": {"configurations": configurations, "epochs": epochs},
                       "models": {"et": {"space": {"train.lr": lr}}, "vit": {"space": {"train.lr": lr}}}}}


def _mid_trial(trials: Path) -> bool:
    """A trial is past its first checkpoint and not finished: a fault now hits it mid-run."""
    return any(epoch >= 1 and not done for epoch, done in trial_progress(trials).values())


def run_grid(cl: LoopbackCluster, spec: dict[str, Any], *, rng: random.Random | None, blackhole_s: float,
             mean_gap_s: float, deadline_s: float, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit ``spec`` and drive it to the end; with ``rng``, inject faults at exponential intervals (mean
    ``mean_gap_s``) whenever a trial is mid-run. Returns wall time, submissions and the faults injected."""
    path = cl.base / "job" / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    trials = cl.shared / spec["name"] / "trials"
    t0 = time.perf_counter()
    sid = cl.submit(cl.sweep_args(path))
    submissions, faults = 1, {k: 0 for k in KINDS}
    next_fault = time.perf_counter() + (rng.expovariate(1 / mean_gap_s) if rng else float("inf"))
    while time.perf_counter() - t0 < deadline_s:
        status = cl.status(sid)
        if status == "SUCCEEDED":
            break
        if status in ("FAILED", "STOPPED"):  # a driver the schedule did not kill: resubmitting is the remedy too
            log.append({"t": time.perf_counter() - t0, "grid": spec["name"], "event": f"job {status}",
                        "tail": cl.logs(sid)[-1500:]})
            sid = cl.submit(cl.sweep_args(path, "--resume"))
            submissions += 1
            continue
        if rng is not None and time.perf_counter() >= next_fault and _mid_trial(trials):
            kind = rng.choice(KINDS)
            log.append({"t": round(time.perf_counter() - t0, 1), "grid": spec["name"], "fault": kind})
            if kind == "node":
                cl.kill_worker()
                time.sleep(10)
                cl.start_worker()
            elif kind == "driver":
                cl.kill_driver(sid)
                sid = cl.submit(cl.sweep_args(path, "--resume"))
                submissions += 1
            else:
                cl.proxy.set_mode("blackhole")
                time.sleep(blackhole_s)
                cl.restart_mlflow()
                cl.proxy.set_mode("pass")
            faults[kind] += 1
            next_fault = time.perf_counter() + rng.expovariate(1 / mean_gap_s)
        time.sleep(0.5)
    status = cl.status(sid)
    return {"status": status, "wall_s": round(time.perf_counter() - t0, 1), "submissions": submissions,
            "faults": faults, "log_tail": cl.logs(sid)[-2000:] if status != "SUCCEEDED" else ""}


def _planned(spec: dict[str, Any], path: Path) -> dict[str, int]:
    from etbench.sweep.grid import expand, load_grid

    path.write_text(yaml.safe_dump(spec))
    return {t.config_hash: t.config.train.epochs for t in expand(load_grid(path))}


def _tuned_state(uri: str, experiment: str) -> dict[str, Any]:
    """Per search group: its tuning runs by status and the configuration the final runs were tuned from."""
    from mlflow.tracking import MlflowClient

    from etbench.tracking import schema as S

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], max_results=50000)
    groups: dict[str, Any] = {}
    for r in runs:
        g = r.data.tags.get(S.TAG_TUNE_GROUP)
        if not g:
            continue
        e = groups.setdefault(g, {"tuning": {}, "selected": set()})
        if r.data.tags.get(S.TAG_STAGE) == S.STAGE_FINAL:
            e["selected"].add(r.data.tags.get(S.TAG_TUNE_PARAMS))
        else:
            e["tuning"][r.info.status] = e["tuning"].get(r.info.status, 0) + 1
    return {g: {"tuning": e["tuning"], "selected": sorted(x for x in e["selected"] if x)} for g, e in groups.items()}


def run_chaos_bench(out: Path, *, trials: int = 52, epochs: int = 8, seed: int = 0, blackhole_s: float = 90,
                    mean_gap_s: float = 20, tuned: bool = True, configurations: int = 4,
                    deadline_s: float = 3600) -> dict[str, Any]:
    """Both grids fault-free, then both under faults, on one cluster; writes ``out/bench_chaos.json``."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    log: list[dict[str, Any]] = []
    rep: dict[str, Any] = {"machine": machine_info("cpu"), "seed": seed, "trials": trials, "epochs": epochs,
                           "blackhole_s": blackhole_s, "mean_gap_s": mean_gap_s, "runs": {}}
    with loopback_cluster(proxy=True, prefix="etbx-") as cl:
        kinds = [("plain", lambda n: plain_grid(n, trials, epochs))]
        if tuned:
            kinds.append(("tuned", lambda n: tuned_grid(n, epochs, configurations)))
        for label, make in kinds:
            for phase in ("clean", "faults"):
                spec = make(f"chaos_{label}_{phase}")
                print(f"bench chaos: {spec['name']} ...", flush=True)
                r = run_grid(cl, spec, rng=rng if phase == "faults" else None, blackhole_s=blackhole_s,
                             mean_gap_s=mean_gap_s, deadline_s=deadline_s, log=log)
                if label == "plain":
                    planned = _planned(spec, cl.base / "job" / f"{spec['name']}.yaml")
                    r["audit"] = audit(cl.direct_uri, spec["name"], planned, cl.shared / spec["name"] / "trials"
                                       ).as_dict()
                else:
                    r["tuned"] = _tuned_state(cl.direct_uri, spec["name"])
                rep["runs"][spec["name"]] = r
                print(f"  {r['status']} in {r['wall_s']} s, faults {r['faults']}", flush=True)
    rep["fault_log"] = log
    rep["summary"] = _summary(rep, configurations)
    (out / "bench_chaos.json").write_text(json.dumps(rep, indent=2, default=str))
    return rep


def _summary(rep: dict[str, Any], configurations: int) -> dict[str, Any]:
    runs = rep["runs"]
    s: dict[str, Any] = {}
    clean, faulted = runs.get("chaos_plain_clean"), runs.get("chaos_plain_faults")
    if clean and faulted:
        a = faulted["audit"]
        s["plain"] = {"faults": faulted["faults"], "runs_lost": a["runs_lost"], "runs_duplicated": a["runs_duplicated"],
                      "runs_left_live": a["runs_left_live"], "trials_retried": a["trials_retried"],
                      "epochs_retrained_at_most": a["attempts"] - a["finished"], "problems": len(a["problems"]),
                      "wall_overhead": round(faulted["wall_s"] / clean["wall_s"], 2) if clean["wall_s"] else None}
    tc, tf = runs.get("chaos_tuned_clean"), runs.get("chaos_tuned_faults")
    if tc and tf:
        groups = sorted(set(tc["tuned"]) | set(tf["tuned"]))
        s["tuned"] = {
            "faults": tf["faults"],
            "budget_kept": all(sum(tf["tuned"].get(g, {}).get("tuning", {}).values()) == configurations
                               and not tf["tuned"][g]["tuning"].get("RUNNING") for g in groups),
            "same_selection": all(tc["tuned"].get(g, {}).get("selected") == tf["tuned"].get(g, {}).get("selected")
                                  for g in groups),
            "wall_overhead": round(tf["wall_s"] / tc["wall_s"], 2) if tc["wall_s"] else None}
    return s
