"""The dedup lookup before a sweep: config hash → (run id, status) of an experiment's runs, without loading runs.

A sweep needs only the ``etbench.config_hash`` tag and the status of each run. ``MlflowClient.search_runs``
builds every run with all its params, metrics and tags (seconds per thousand runs), so on a SQL store (sqlite,
postgresql, mysql, mssql) this reads MLflow's ``runs`` and ``tags`` tables with one indexed query instead; on a
tracking server it pages through ``search_runs`` (narrowed by a filter where one applies).
"""

from __future__ import annotations

from dataclasses import dataclass

from etbench.tracking import schema as S

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
PAGE_SIZE = 1000


@dataclass(frozen=True)
class RunRef:
    """What the dedup needs of one run. ``info`` returns the ref itself, so code written against MLflow ``Run``
    objects (``r.info.status``, ``r.info.run_id``) reads it unchanged."""

    run_id: str
    status: str
    start_time: int | None
    config_hash: str
    stopped_early: bool = False  # tag etbench.stopped_early: a truncated (ASHA-stopped) run, never a full result
    superseded: bool = False  # tag etbench.superseded: replaced by `--force`, never reused or deduplicated against
    parent_run_id: str | None = None  # tag mlflow.parentRunId: the grid's parent run (etbench.tracking.grid_run)

    @property
    def info(self) -> RunRef:
        return self

    @property
    def complete(self) -> bool:
        """A FINISHED run that stands for its config hash: not stopped early, not superseded."""
        return self.status == "FINISHED" and not self.stopped_early and not self.superseded


def is_sql_store(uri: str | None) -> bool:
    """Whether MLflow reads ``uri`` through SQLAlchemy (a database, not a server or a folder)."""
    return bool(uri) and str(uri).split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def _experiment_id(uri: str, experiment: str) -> str | None:
    """The experiment's id: straight from MLflow's experiments table on a SQL store (building an MlflowClient
    there imports and checks MLflow's whole SQL store, seconds), else from the client."""
    if is_sql_store(uri):
        from sqlalchemy import create_engine, text

        engine = create_engine(uri)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT experiment_id FROM experiments WHERE name = :n"),
                                    {"n": experiment}).all()
        except Exception:  # no MLflow tables (yet): let the client answer below
            rows = None
        finally:
            engine.dispose()
        if rows is not None and len(rows) <= 1:
            return str(rows[0][0]) if rows else None
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    return None if exp is None else exp.experiment_id


def _sql_refs(uri: str, exp_id: str, config_hash: str | None, status: str | None) -> list[RunRef]:
    from sqlalchemy import create_engine, text

    where = ["r.experiment_id = :exp", "r.lifecycle_stage = 'active'"]
    args: dict[str, object] = {"exp": int(exp_id), "key": S.TAG_CONFIG_HASH}
    if config_hash is not None:
        where.append("t.value = :hash")
        args["hash"] = config_hash
    if status is not None:
        where.append("r.status = :status")
        args["status"] = status
    args.update(stop=S.TAG_STOPPED_EARLY, sup=S.TAG_SUPERSEDED, parent=S.TAG_PARENT_RUN)
    query = text("SELECT r.run_uuid, r.status, r.start_time, t.value, s.value, u.value, p.value FROM runs r JOIN "
                 "tags t ON t.run_uuid = r.run_uuid AND t.key = :key "
                 "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = :stop "
                 "LEFT JOIN tags u ON u.run_uuid = r.run_uuid AND u.key = :sup "
                 "LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = :parent WHERE " + " AND ".join(where) +
                 " ORDER BY r.start_time DESC, r.run_uuid")  # search_runs' default order
    engine = create_engine(uri)
    try:
        with engine.connect() as conn:
            rows = conn.execute(query, args).all()
    finally:
        engine.dispose()
    return [RunRef(run_id=r[0], status=r[1], start_time=r[2], config_hash=r[3], stopped_early=bool(r[4]),
                   superseded=r[5] == "true", parent_run_id=r[6] or None) for r in rows]


def _api_refs(uri: str, exp_id: str, config_hash: str | None, status: str | None) -> list[RunRef]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    filters = [f"tags.`{S.TAG_CONFIG_HASH}` = '{config_hash}'"] if config_hash is not None else []
    filters += [f"attributes.status = '{status}'"] if status is not None else []
    out: list[RunRef] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp_id], filter_string=" and ".join(filters), max_results=PAGE_SIZE,
                                  page_token=token)
        for r in page:
            h = r.data.tags.get(S.TAG_CONFIG_HASH)
            if h:
                tags = r.data.tags
                out.append(RunRef(run_id=r.info.run_id, status=r.info.status, start_time=r.info.start_time,
                                  config_hash=h, stopped_early=bool(tags.get(S.TAG_STOPPED_EARLY)),
                                  superseded=tags.get(S.TAG_SUPERSEDED) == "true",
                                  parent_run_id=tags.get(S.TAG_PARENT_RUN) or None))
        token = page.token
        if not token:
            return out


def run_refs(uri: str, experiment: str, *, config_hash: str | None = None, status: str | None = None
             ) -> list[RunRef]:
    """Active runs of ``experiment`` that carry a config hash (optionally only ``config_hash`` / ``status``),
    newest first; empty when the experiment does not exist."""
    exp_id = _experiment_id(uri, experiment)
    if exp_id is None:
        return []
    read = _sql_refs if is_sql_store(uri) else _api_refs
    return read(uri, exp_id, config_hash, status)


def runs_by_hash(uri: str, experiment: str) -> dict[str, list[RunRef]]:
    """Config hash → its runs (newest first), for the sweep's dedup and resume."""
    out: dict[str, list[RunRef]] = {}
    for ref in run_refs(uri, experiment):
        out.setdefault(ref.config_hash, []).append(ref)
    return out


def finished_run_ids(uri: str, experiment: str, config_hash: str) -> list[str]:
    """Run ids of the complete FINISHED runs with this config hash (the per-trial dedup check): a run stopped early
    by a scheduler or superseded by ``--force`` is never taken for a finished trial."""
    return [r.run_id for r in run_refs(uri, experiment, config_hash=config_hash, status="FINISHED") if r.complete]
