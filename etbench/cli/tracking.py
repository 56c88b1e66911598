"""``etbench tracking rehash``: re-tag a store's runs with the science config hash (``etbench.tracking.rehash``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def rehash_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="the MLflow store (default: the SQLite store in --results)")
    p.add_argument("--results", default="results", help="storage folder whose mlflow.db to migrate (no --tracking-uri)")
    p.add_argument("--experiment", help="only this MLflow experiment (default: every experiment)")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")


def rehash(a: argparse.Namespace) -> int:
    """Re-tag the runs whose stored hash still counts an execution setting; print each change."""
    from etbench.tracking.rehash import RehashError
    from etbench.tracking.rehash import rehash as run_rehash

    uri = a.tracking_uri
    if not uri:
        db = Path(a.results).resolve() / "mlflow.db"
        if not db.is_file():
            raise RehashError(f"no MLflow store at {db}: give --tracking-uri or --results")
        uri = f"sqlite:///{db}"
    res = run_rehash(uri, a.experiment, dry_run=a.dry_run, echo=print)
    verb = "would re-tag" if a.dry_run else "re-tagged"
    print(f"{verb} {len(res.changed)} run(s) (old hash kept in tag etbench.config_hash_v1), {res.unchanged} "
          f"already at their science hash, {len(res.skipped)} skipped")
    if res.changed and not a.dry_run:
        print("trial folders under an old hash are not moved: a FINISHED run's is no longer needed (the next sweep "
              "skips its config); an unfinished run re-trains under the new hash")
    return 0
