"""`etbench bench sweep`: what the sweep machinery costs per trial, and what trial concurrency buys.

All in ONE local loopback Ray session on ``cpus`` logical CPUs, each sweep in a fresh results directory (its own
MLflow sqlite store), on the small digits ET (one epoch of ``steps`` batches, ``limit_train = steps · batch``):

1. 1-worker trials of ONE training step: a sequential sweep (``max_concurrent_trials=1``) of ``trials`` trials.
   Per-trial wall = sweep wall / trials; overhead = per-trial wall − the same run done in this (warm) process with
   ``etbench.engine.run.run_single``. The overhead is everything a sweep adds: Tune scheduling, a fresh actor
   process and its imports, MLflow tracking, Tune bookkeeping, the sweep's plan/dedup queries (amortised).
2. Concurrency: ``trials`` trials of ``speedup_epochs`` epochs over 1,280 digits each (one CPU, one thread per
   trial; a trial computes for seconds, as real trials do), sequential vs ``max_concurrent_trials=2``;
   speed-up = median sequential wall / median concurrent wall over ``speedup_repeats`` interleaved pairs.
   The same comparison on the one-step trials is recorded too:
   there Tune's fixed start-up (~6 s before the first trial, ~3 s for a fresh actor's first run) dwarfs
   8 × 0.2 s of work, so it only measures that.
3. The floor: a bare ``TorchTrainer(num_workers=2).fit()`` of a loop that only reports once, measured before and
   after step 4 (median). Beside it, two references that show what a *fresh* worker process must load before any
   tracked DeepSpeed rank can train (``torchtrainer_floor.fresh_rank_imports_s``): ``import deepspeed`` (with the
   MLflow it imports) + ``deepspeed.initialize`` of a one-layer model with torch AdamW (which imports
   ``torch._dynamo``) at the trials' ZeRO stage (0, the run default), and additionally rank 0's MLflow SQLite store.
   Ray Train V2
   starts new worker processes for every ``fit()``, so every 2-worker trial pays these; the trial's cost over the
   second reference is what etbench itself adds (``two_worker.over_fresh_tracked_rank_floor_s``).
4. 2-worker trials (Ray Train + DeepSpeed through ``etbench.engine.launch.fit``), one sequential sweep of
   ``two_worker_trials``. A trial's cost is the interval between consecutive trial completions (median over trials
   2..n): everything a trial adds — Tune's scheduling, the dedup query, the MLflow run, the TorchTrainer with its
   DeepSpeed ranks, tracking, checkpoints — but not the sweep's one-off start-up (Tune's first scheduling, the
   trial actor's first imports), which is recorded beside it (``sweep_fixed_s``), as is the plain sweep wall /
   trials. Over-floor = that cost − floor. Each trial's worker phases (data, DeepSpeed init, training, epilogue)
   come back in its summary. Reported as not available while that module is not importable.

Before anything is timed, DeepSpeed's CPU communication op is loaded (JIT-built if its cache is stale — ~50 s,
once per machine and Python environment; left in, it would land on the first 2-worker trial).

Targets (pass/fail in the JSON): 1-worker overhead < 10 s per trial; 2-worker trials within 5 s of the floor;
speed-up ≥ 1.7×. The machine's load average is recorded: other processes on the CPUs skew every figure.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from etbench.bench.common import machine_info, write_json

TARGETS = {"one_worker_overhead_s": 10.0, "two_worker_over_floor_s": 5.0, "speedup": 1.7}
ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1",
                "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "DS_ACCELERATOR": "cpu"}


def one_step_grid(name: str, trials: int, *, workers: int = 1, cpus_per_worker: float = 1.0,
                  concurrency: int = 1, batch: int = 32, steps: int = 1, epochs: int = 1) -> dict[str, Any]:
    """A grid of ``trials`` runs (seeds 0..trials-1) of the small digits ET on the CPU, each ``epochs`` epochs of
    ``steps`` training steps (digits holds ~1,290 training images: steps · batch must fit)."""
    if trials < 1 or batch < workers or steps < 1 or epochs < 1:
        raise ValueError(f"need trials, steps, epochs >= 1 and batch >= workers, got trials={trials}, "
                         f"steps={steps}, epochs={epochs}, batch={batch}, workers={workers}")
    if steps * batch > 1280:
        raise ValueError(f"steps · batch = {steps * batch} exceeds the digits training split (1,280 used at most)")
    return {
        "name": name,
        "base": {"task": {"kind": "image", "dataset": "digits", "limit_train": batch * steps, "limit_eval": batch},
                 "train": {"epochs": epochs, "batch_size": batch, "eval_trace_samples": 2, "device": "cpu",
                           "warmup_epochs": 0}},
        "models": ["et"],
        "seeds": list(range(trials)),
        "resources": {"workers": workers, "cpus_per_worker": cpus_per_worker},
        "max_concurrent_trials": concurrency,
    }


FLOOR_VARIANTS = ("bare", "deepspeed", "deepspeed_mlflow")


def _floor_train_loop(config: dict[str, Any]) -> None:
    """One report, after loading what a fresh rank of the given ``variant`` must load and nothing of etbench's.

    ``bare``: nothing. ``deepspeed``: ``import deepspeed`` and ``deepspeed.initialize`` of a one-layer model with a
    ``torch.optim.AdamW`` (whose construction imports ``torch._dynamo``) at the trials' ZeRO stage.
    ``deepspeed_mlflow``: that, and on rank 0 the MLflow SQLite store a tracked run logs to (``import mlflow`` comes
    with ``deepspeed`` already).
    """
    import ray.train

    if config["variant"] != "bare":
        import deepspeed

        world = ray.train.get_context().get_world_size()
        layer = torch.nn.Linear(4, 4)
        deepspeed.initialize(model=layer, optimizer=torch.optim.AdamW(layer.parameters()), config={
            "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": config["zero_stage"]}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9})
        if config["variant"] == "deepspeed_mlflow" and ray.train.get_context().get_world_rank() == 0:
            from mlflow.tracking import MlflowClient

            MlflowClient(config["tracking_uri"]).search_experiments(max_results=1)
    ray.train.report({"ok": 1})


def torchtrainer_floor(storage: Path, cpus_per_worker: float, name: str, variant: str = "bare",
                       tracking_uri: str | None = None, zero_stage: int = 0) -> float:
    """Wall seconds of a 2-worker ``TorchTrainer.fit()`` whose loop is :func:`_floor_train_loop` of ``variant``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if variant not in FLOOR_VARIANTS or (variant == "deepspeed_mlflow" and not tracking_uri):
        raise ValueError(f"variant must be one of {FLOOR_VARIANTS} (deepspeed_mlflow needs tracking_uri), "
                         f"got {variant!r}, tracking_uri={tracking_uri!r}")
    trainer = TorchTrainer(_floor_train_loop, train_loop_config={"variant": variant, "tracking_uri": tracking_uri,
                                                                 "zero_stage": zero_stage},
                           scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(name=name, storage_path=str(storage)))
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def _floors(work: Path, cpus_per_worker: float, rounds: range, variants: tuple[str, ...],
            tracking_uri: str | None, into: dict[str, list[float]]) -> None:
    """Measure each variant once per round, rotating the order between rounds (the machine's load drifts)."""
    for r in rounds:
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            into[v].append(torchtrainer_floor(work / "floor", cpus_per_worker, f"floor-{v}-{r}", v, tracking_uri))


def _run_grid(grid: dict[str, Any], work: Path) -> dict[str, Any]:
    """Write the grid, run it as a sweep in a fresh results dir; wall time and Tune's per-trial records."""
    from etbench.sweep.runner import run_sweep

    path = work / f"{grid['name']}.yaml"
    path.write_text(yaml.safe_dump(grid))
    results = work / f"results-{grid['name']}"
    t0_unix, t0 = time.time(), time.perf_counter()
    res = run_sweep(path, results_dir=results, progress=False)
    wall = time.perf_counter() - t0
    if res.failed or len(res.finished) != len(grid["seeds"]):
        raise RuntimeError(f"benchmark sweep {grid['name']} did not finish cleanly: {len(res.finished)} finished, "
                           f"failed: {json.dumps(res.failed)[:2000]}")
    rows = [json.loads(line) for f in sorted(results.glob("ray/*/*/result.json"))
            for line in f.read_text().splitlines() if line.strip()]
    ends = sorted(float(r.get("finished_unix", r["timestamp"])) for r in rows)  # each trial's completion
    return {"wall_s": wall, "in_actor_s": [float(r["time_total_s"]) for r in rows], "path": path,
            "start_unix": t0_unix, "ends_unix": ends}


def steady_state(run: dict[str, Any]) -> dict[str, Any]:
    """Per-trial cost of a sequential sweep without its one-off start-up: the median gap between completions."""
    ends = run["ends_unix"]
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    first = ends[0] - run["start_unix"] if ends else None
    return {"completion_gaps_s": gaps, "per_trial_s": statistics.median(gaps) if gaps else None,
            "first_trial_done_s": first,
            "sweep_fixed_s": (first - statistics.median(gaps)) if gaps and first is not None else None}


def _phases(results: Path) -> list[dict[str, float]]:
    """Rank 0's phase timings (data, DeepSpeed init, training, epilogue) of every distributed trial under results."""
    out = []
    for f in sorted(results.glob("*/trials/*/summary.json")):
        phases = json.loads(f.read_text()).get("distributed", {}).get("phases_s", {})
        out.append({k: round(float(v), 3) for k, v in phases.items() if k.endswith("_s")})
    return out


def _in_process_run_s(grid_path: Path, work: Path, repeats: int = 2) -> float:
    """Median wall of the grid's first run done in this process, after one warm-up run (imports, caches)."""
    from etbench.engine.run import run_single
    from etbench.sweep.grid import expand, load_grid

    cfg = expand(load_grid(grid_path))[0].config
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))  # as in a trial actor (Ray sets OMP threads)
    times = []
    try:
        for i in range(repeats + 1):
            out = work / f"inproc-{i}"
            t0 = time.perf_counter()
            run_single(cfg, out, progress=False)
            if i:
                times.append(time.perf_counter() - t0)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def _target(value: float | None, target: float, higher_is_better: bool) -> dict[str, Any]:
    ok = None if value is None else (value >= target if higher_is_better else value < target)
    return {"value": value, "target": target, "pass": ok}


def launch_available() -> str | None:
    """None when ``etbench.engine.launch.fit`` can be imported, else why not."""
    if importlib.util.find_spec("etbench.engine.launch") is None:
        return "etbench.engine.launch is not available yet (module missing)"
    try:
        from etbench.engine import launch
    except Exception as e:  # a half-finished module: report it, do not crash the whole benchmark
        return f"etbench.engine.launch failed to import: {type(e).__name__}: {e}"
    return None if callable(getattr(launch, "fit", None)) else "etbench.engine.launch has no fit()"


def run_sweep_bench(out: Path, *, trials: int = 8, cpus: int = 2, batch: int = 32, floor_repeats: int = 3,
                    two_worker_trials: int = 4, two_worker_cpus: float = 0.45,
                    speedup_epochs: int = 4, speedup_repeats: int = 3) -> dict[str, Any]:
    """Measure per-trial overhead, the TorchTrainer floor and the concurrency speed-up; write bench_sweep.json."""
    if trials < 2 or cpus < 2 or speedup_repeats < 1:
        raise ValueError(f"the concurrency comparison needs trials >= 2, cpus >= 2 and speedup_repeats >= 1, got "
                         f"{trials}, {cpus}, {speedup_repeats}")
    if not 0 < two_worker_cpus <= (cpus - 0.1) / 2:
        raise ValueError(f"two_worker_cpus must be in (0, {(cpus - 0.1) / 2:.2f}] so 2 workers + the trial driver "
                         f"fit on {cpus} CPUs, got {two_worker_cpus}")
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    from etbench.sweep.runner import LOCAL_RAY_IP

    if ray.is_initialized():
        raise RuntimeError("run_sweep_bench needs its own Ray session: call ray.shutdown() first")
    report: dict[str, Any] = {"machine": {**machine_info("cpu"), "loadavg_before": list(os.getloadavg())},
                              "config": {"trials": trials, "cpus": cpus, "batch": batch, "steps_per_trial": 1,
                                         "speedup_steps_per_trial": speedup_epochs * (1280 // batch),
                                         "floor_repeats": floor_repeats, "two_worker_trials": two_worker_trials,
                                         "two_worker_cpus_per_worker": two_worker_cpus}}
    why_not = launch_available()  # None: the 2-worker trials (and the DeepSpeed reference floors) can run
    if why_not is None:
        from etbench.engine.warmup import warm_deepspeed

        report["deepspeed_op_load_s"] = warm_deepspeed()
    work = Path(tempfile.mkdtemp(prefix="etbench-bench-sweep-"))
    env = {k: os.environ[k] for k in ENV_DEFAULTS}
    t_init = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, _node_ip_address=LOCAL_RAY_IP, include_dashboard=False,
             runtime_env={"env_vars": env}, log_to_driver=False)
    report["ray_init_s"] = time.perf_counter() - t_init
    try:
        _run_grid(one_step_grid("warmup", 1, batch=batch), work)  # first actors, sqlite migrations, caches
        seq = _run_grid(one_step_grid("seq", trials, concurrency=1, batch=batch), work)
        conc = _run_grid(one_step_grid("conc", trials, concurrency=2, batch=batch), work)
        in_proc = _in_process_run_s(seq["path"], work)
        per_trial = seq["wall_s"] / trials
        report["one_worker"] = {
            "sequential_wall_s": seq["wall_s"], "per_trial_wall_s": per_trial, "in_process_run_s": in_proc,
            "overhead_per_trial_s": per_trial - in_proc,
            "in_actor_median_s": statistics.median(seq["in_actor_s"]),
        }
        steps = 1280 // batch
        walls: dict[int, list[float]] = {1: [], 2: []}
        in_actor: dict[int, list[float]] = {1: [], 2: []}
        for r in range(speedup_repeats):  # interleaved (seq, conc), (conc, seq), …: this machine's load drifts
            for c in ((1, 2) if r % 2 == 0 else (2, 1)):
                res = _run_grid(one_step_grid(f"long-c{c}-r{r}", trials, concurrency=c, batch=batch, steps=steps,
                                              epochs=speedup_epochs), work)
                walls[c].append(res["wall_s"])
                in_actor[c] += res["in_actor_s"]
        speedup = statistics.median(walls[1]) / statistics.median(walls[2])
        report["concurrency"] = {
            "max_concurrent_trials": 2, "steps_per_trial": speedup_epochs * steps, "repeats": speedup_repeats,
            "sequential_wall_s": walls[1], "concurrent_wall_s": walls[2], "speedup": speedup,
            "in_actor_median_s": {"sequential": statistics.median(in_actor[1]),
                                  "concurrent": statistics.median(in_actor[2])},
            "one_step_trials": {"sequential_wall_s": seq["wall_s"], "concurrent_wall_s": conc["wall_s"],
                                "speedup": seq["wall_s"] / conc["wall_s"]}}
        # the floors are noisy (±3 s here): measured on both sides of the 2-worker sweep, medians taken
        variants = FLOOR_VARIANTS if why_not is None else ("bare",)
        from etbench.tracking.mlflow_log import default_tracking_uri

        uri = default_tracking_uri(work / "results-seq")  # an existing store, as a trial's rank 0 finds it
        floor_runs: dict[str, list[float]] = {v: [] for v in variants}
        _floors(work, two_worker_cpus, range((floor_repeats + 1) // 2), variants, uri, floor_runs)
        over_floor = None
        two: dict[str, Any] | None = None
        if why_not is None and two_worker_trials >= 1:
            two = _run_grid(one_step_grid("two", two_worker_trials, workers=2, cpus_per_worker=two_worker_cpus,
                                          concurrency=1, batch=batch), work)
        _floors(work, two_worker_cpus, range((floor_repeats + 1) // 2, floor_repeats), variants, uri, floor_runs)
        medians = {v: statistics.median(t) for v, t in floor_runs.items() if t}
        floor = medians.get("bare")
        report["torchtrainer_floor"] = {
            "num_workers": 2, "times_s": floor_runs["bare"], "median_s": floor,
            "variants": {v: {"times_s": t, "median_s": medians.get(v)} for v, t in floor_runs.items()},
            "fresh_rank_imports_s": {v: medians[v] - floor for v in medians if v != "bare" and floor is not None}}
        if two is None:
            report["two_worker"] = {"available": False, "reason": why_not or "two_worker_trials = 0"}
        else:
            steady = steady_state(two)
            per_two = steady["per_trial_s"] if steady["per_trial_s"] is not None else two["wall_s"] / two_worker_trials
            over_floor = per_two - floor if floor is not None else None
            ref = medians.get("deepspeed_mlflow")
            report["two_worker"] = {"available": True, "trials": two_worker_trials,
                                    "sequential_wall_s": two["wall_s"],
                                    "wall_per_trial_incl_startup_s": two["wall_s"] / two_worker_trials,
                                    "per_trial_s": per_two, "over_floor_s": over_floor,
                                    "over_fresh_tracked_rank_floor_s": per_two - ref if ref is not None else None,
                                    **steady, "in_actor_s": two["in_actor_s"],
                                    "phases_s": _phases(work / "results-two")}
        report["targets"] = {
            "one_worker_overhead_lt_10s": _target(per_trial - in_proc, TARGETS["one_worker_overhead_s"], False),
            "two_worker_within_5s_of_floor": _target(over_floor, TARGETS["two_worker_over_floor_s"], False),
            "speedup_ge_1.7": _target(speedup, TARGETS["speedup"], True),
        }
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    write_json(report, Path(out), "bench_sweep")
    return report
