"""Log one etbench run to MLflow following ``etbench.tracking.schema`` (rank 0 only; URI always explicit).

The default store is an embedded SQLite database under the results directory (no server needed); a cluster passes
``http://HEAD:5000``. Experiments are created with an explicit absolute artifact location so Ray workers running
in other working directories do not scatter artifacts.

A server is a sink (:mod:`etbench.tracking.outage`): per-epoch logging that finds it unreachable returns without
raising; the epochs wait in the trial folder (``metrics.json``, the checkpoint's history) and go out with the next
flush that reaches it, after re-reading which epochs the run holds.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from etbench.tracking import schema as S
from etbench.tracking.outage import is_server, retry_s, short_calls, unreachable
from etbench.tracking.ui import EXPERIMENT_TAGS, mark_model_training, publish_runs_view

EPOCH_KEY = "train/loss"  # logged at every epoch of every task (etbench.engine.loop)
log = logging.getLogger(__name__)
OPEN_TOKEN_TAG = "etbench.open_token"  # one per created run: how a retried create finds a run that did land
PACKAGES = ("torch", "ray", "deepspeed", "mlflow", "torch_geometric", "numpy", "etbench")


def default_tracking_uri(results_dir: Path) -> str:
    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{results_dir / 'mlflow.db'}"


def git_commit() -> str:
    """The submitter's commit when it was passed on (``$ETBENCH_GIT_COMMIT``, set by etbench.storage for every Ray
    worker: a cluster's working-dir copy has no .git), else this checkout's HEAD, else "unknown"."""
    import os

    if os.environ.get("ETBENCH_GIT_COMMIT"):
        return os.environ["ETBENCH_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> str:
    """"true"/"false": uncommitted changes to tracked files where the run was submitted ("unknown" if not known)."""
    import os

    if os.environ.get("ETBENCH_GIT_COMMIT"):
        return os.environ.get("ETBENCH_GIT_DIRTY", "unknown")
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "true" if out.strip() else "false"


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def ensure_experiment(client: Any, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_model_training(client, exp)
        return exp.experiment_id
    loc = None
    if artifact_root is not None:
        loc = (Path(artifact_root).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=loc, tags=EXPERIMENT_TAGS)
    except Exception:  # another trial created it concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def axis_tag_name(key: str) -> str:
    """Config path → axis tag name: ET sizes drop their ``et.`` level (``model.et.steps`` → ``model.steps``)."""
    return key.replace("model.et.", "model.", 1) if key.startswith("model.et.") else key


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(float(v))


class RunTracker:
    """One MLflow run: tags + params at start, per-epoch metrics, summary/trace/artifacts at the end, status."""

    identity_dir: Path | None = None  # the trial folder whose tracking.json each logged epoch refreshes
    _steps: set[int] | None = None  # epochs (steps) this run already holds: never logged twice
    _attached: bool = False  # an existing run (its epochs are read from the store), not one this tracker created
    commit_every: int | None = None  # log an epoch only once a checkpoint covers it (every k epochs); None: at once
    _pending: dict[int, dict[str, float]] | None = None
    _stale: bool = False  # a call failed mid-flight: what the run holds is re-read before the next write
    _offline_until: float = 0.0  # no sink call before this time (the server was unreachable)
    _offline_since: float | None = None
    _summary_ts: int | None = None  # one timestamp for the summary's points, so a retry writes the same rows
    _open_token: str | None = None  # tags the run this tracker creates: a create whose answer was lost is found
    _experiment_id: str | None = None
    artifact_root: Path | None = None
    sink: bool = False  # the store is a server that can be unreachable (etbench.tracking.outage)

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self._experiment_id: str | None = None  # resolved on first use: constructing a tracker needs no server
        self.run_name = run_name
        self.run_id: str | None = None
        self.sink = is_server(tracking_uri)

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(self.client, self.experiment, self.artifact_root)
        return self._experiment_id

    @experiment_id.setter
    def experiment_id(self, value: str) -> None:
        self._experiment_id = value

    def start(self, cfg: Any, *, grid: str, axes: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
        """Create the run with the schema's tags and the flattened resolved config as params."""
        task = cfg.task
        tags = {
            S.TAG_CONFIG_HASH: cfg.hash(),
            S.TAG_GRID: grid,
            S.TAG_TASK: task.kind,
            S.TAG_MODEL: cfg.model.name,
            S.TAG_DATASET: task.dataset,
            S.TAG_PROTOCOL: "masked-completion" if task.kind == "image" else task.protocol,
            S.TAG_SEED: str(cfg.train.seed),
            S.TAG_SPLIT: str(getattr(task, "split", -1)) if task.kind == "graph" else "-1",
            S.TAG_PAPER_COMPARABLE: "true" if cfg.paper_comparable else "false",
            S.TAG_GIT_COMMIT: git_commit(),
            S.TAG_GIT_DIRTY: git_dirty(),
            S.TAG_VERSIONS: json.dumps(package_versions()),
            "mlflow.runName": self.run_name,
        }
        if data and "checksum" in data:
            tags[S.TAG_DATASET_CHECKSUM] = str(data["checksum"])
        for k, v in (axes or {}).items():
            tags[S.TAG_AXIS_PREFIX + axis_tag_name(k)] = str(v)
        tags.update(extra_tags or {})
        run = self._created()
        if run is None:
            self._open_token = uuid.uuid4().hex
            run = self.client.create_run(self.experiment_id, tags={**tags, OPEN_TOKEN_TAG: self._open_token},
                                         run_name=self.run_name)
        self.run_id = run.info.run_id
        self._steps, self._attached = set(), False
        self.log_params(cfg.flat())
        return self.run_id

    def _created(self) -> Any:
        """The run an earlier ``start`` of this tracker created although its answer was lost (a retry after a
        timeout must not open a second run), else None."""
        if self._open_token is None:
            return None
        found = self.client.search_runs([self.experiment_id], f"tags.`{OPEN_TOKEN_TAG}` = '{self._open_token}'",
                                        max_results=1)
        return found[0] if found else None

    def attach(self, run_id: str) -> None:
        self.run_id = run_id
        self._steps, self._attached = None, True  # its epochs are read from the store on the first one logged

    @property
    def attached(self) -> bool:
        """Whether the tracker re-attached an existing run (not one it created)."""
        return self._attached

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self._id(), key, value)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Several tags in one call (the provenance and placement tags of each attempt's training process)."""
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self._id(), tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def logged_epochs(self) -> set[int]:
        """The epochs (1-based steps of ``train/loss``, which every epoch row has) the run already holds. Read
        from the store for an attached run, and again after a call that failed mid-flight (its write may have
        committed although no answer came back: re-logging it would duplicate the step)."""
        if self._steps is None or self._stale:
            self._steps = ({m.step for m in self.client.get_metric_history(self._id(), EPOCH_KEY)}
                           if self._attached or self._stale else set())
            self._stale = False
        return self._steps

    def mark_stale(self) -> None:
        """A call failed without an answer: re-read what the run holds before writing again."""
        self._stale = True

    def sink_call(self, fn: Callable[[], None], what: str) -> bool:
        """``fn()`` (MLflow calls) unless the server is unreachable: then False, and no call is tried before
        ``$ETBENCH_TRACKING_RETRY_S`` has passed. Errors that are not an outage raise; a local store is no sink."""
        if not self.sink:
            fn()
            return True
        if time.time() < self._offline_until:
            return False
        try:
            with short_calls():
                fn()
        except Exception as exc:
            if not unreachable(exc):
                raise
            self._stale, self._offline_until = True, time.time() + retry_s()
            if self._offline_since is None:
                self._offline_since = time.time()
                log.warning("MLflow server %s unreachable while %s (%s): training goes on; the epochs wait in the "
                            "trial folder and are sent when it answers again", self.uri, what, exc)
            return False
        if self._offline_since is not None:
            log.warning("MLflow server %s answers again after %.0f s; waiting epochs sent", self.uri,
                        time.time() - self._offline_since)
            self._offline_since = None
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._id(), params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self._log_points([(k, v, step) for k, v in metrics.items()])

    def _log_points(self, points: list[tuple[str, Any, int]], ts: int | None = None) -> None:
        """(name, value, step) points in as few ``log_batch`` calls as MLflow allows (one SQL transaction each)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if ts is None else ts
        items = [Metric(k, float(v), ts, step) for k, v, step in points if _finite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self._id(), metrics=items[i : i + 1000])

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """Epoch ``epoch`` (0-based) at step ``epoch + 1``, unless the run already holds that step (a retried or
        resumed attempt re-trains epochs after its checkpoint: the run keeps each epoch once).

        With ``commit_every = k`` (a Ray Train run, whose ranks checkpoint every k epochs after logging) an epoch
        waits until a later epoch is logged and a checkpoint covers it, so an epoch that a restarted worker group
        trains again never reached MLflow; :meth:`log_history` adds what is still waiting at the end."""
        if self.commit_every is None:
            self.log_epochs({epoch + 1: row})
            return
        if self._pending is None:
            self._pending = {}
        self._pending[epoch + 1] = row
        covered = (epoch // self.commit_every) * self.commit_every  # the last checkpointed epoch before this one
        self.log_epochs({s: r for s, r in self._pending.items() if s <= covered}, covered=covered)

    def log_epochs(self, rows: dict[int, dict[str, float]], covered: int | None = None) -> bool:
        """Epoch rows by 1-based step (plus, up to ``covered``, the epochs of ``metrics.json`` the run lacks),
        those the run does not hold, in step order; on a server, a sink call (False: unreachable, kept waiting)."""

        def push() -> None:
            due = dict(rows)
            held = self.logged_epochs()
            missing = [s for s in range(1, (covered or 0) + 1) if s not in held and s not in due]
            if missing and self.identity_dir is not None and (self.identity_dir / "metrics.json").exists():
                on_disk = json.loads((self.identity_dir / "metrics.json").read_text())  # a resumed attempt's
                due.update({s: on_disk[s - 1] for s in missing if s <= len(on_disk)})  # checkpointed epochs
            for step in sorted(due):
                self._log_epoch_now(step - 1, due[step])
                if self._pending:
                    self._pending.pop(step, None)

        done = self.sink_call(push, "logging epochs")
        if not done and self.identity_dir is not None:
            from etbench.tracking.identity import heartbeat

            heartbeat(self.identity_dir)  # the attempt's wall time still counts while the server is away
        return done

    def log_history(self, history: list[dict[str, float]]) -> None:
        """Every epoch of a finished attempt's history (metrics.json) the run does not hold yet (raises when the
        server is unreachable: the end of a run waits for it, :func:`etbench.tracking.outage.wait_for`)."""
        self._pending = {}
        for i, row in enumerate(history):
            self._log_epoch_now(i, row)

    def _log_epoch_now(self, epoch: int, row: dict[str, float]) -> None:
        if epoch + 1 in self.logged_epochs():
            return
        self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        self.logged_epochs().add(epoch + 1)
        if self.identity_dir is not None:
            from etbench.tracking.identity import heartbeat

            heartbeat(self.identity_dir)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """best/*, cost/* and the energy trace means (energy/* with step = descent step), in one batch. Values the
        run already holds are not logged again (an earlier attempt, or a call whose answer was lost, sent them);
        a retry in this process writes the same timestamps (stores drop an identical row)."""
        points: list[tuple[str, Any, int]] = [(f"best/{k}", v, 0) for k, v in summary.get("best", {}).items()]
        points.append(("best/epoch", summary.get("best_epoch", float("nan")), 0))
        points += [(f"cost/{k}", v, 0) for k, v in summary.get("cost", {}).items()]
        energy = summary.get("energy")
        if energy:
            points.append((S.ENERGY_RISE, energy["rise_fraction"], 0))
            for key in (*S.ENERGY_METRICS, *S.ENERGY_DIAGNOSTICS):
                points += [(key, v, t) for t, v in enumerate(energy.get(key.split("/", 1)[1], []))]
            if energy.get("fixed_point_step") is not None:  # absent when the descent never reached one
                points.append((S.ENERGY_FIXED_POINT, energy["fixed_point_step"], 0))
        keys = [k for k, v, _ in points if _finite(v)]
        if self._attached or self._stale or self._summary_ts is not None:  # what the run holds is not sent again
            held = self.client.get_run(self._id()).data.metrics  # (latest values; a changed value, such as a
            series = {k for k, n in Counter(keys).items() if n > 1}  # cost/wall_s grown by a later attempt, goes)
            points = [p for p in points if p[0] not in held or (p[0] not in series and held[p[0]] != float(p[1]))]
        if self._summary_ts is None:
            self._summary_ts = int(time.time() * 1000)
        self._log_points(points, self._summary_ts)
        publish_runs_view(self.client, self.experiment_id, keys)

    def log_artifacts(self, out: Path, names: list[str]) -> None:
        for n in names:
            p = Path(out) / n
            if p.is_file():
                self.client.log_artifact(self._id(), str(p))

    def finish(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.run_id is None:
            return
        if error:
            self.client.set_tag(self.run_id, S.TAG_ERROR, error[:5000])
        self.client.set_terminated(self.run_id, status=status)

    def _id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("RunTracker.start() was not called")
        return self.run_id


def find_finished(tracking_uri: str, experiment: str, config_hash: str) -> list[str]:
    """Run ids of FINISHED runs with this config hash in ``experiment`` (the dedup query; hash and status only)."""
    from etbench.tracking.lookup import finished_run_ids

    return finished_run_ids(tracking_uri, experiment, config_hash)


RUN_ARTIFACTS = ["config.json", "metrics.csv", "summary.json", S.ENERGY_TRACE_ARTIFACT, "reconstruction.png",
                 "memories.png"]
