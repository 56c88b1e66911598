"""Make the MLflow UI open etbench experiments as model training: the runs table with etbench's metric columns.

MLflow 3 has two workspaces. An experiment declares which it belongs to with the tag ``mlflow.experimentKind``
(``custom_model_development`` = model training); etbench sets it on every experiment it creates or logs into.
The 3.x UI installed here (3.17) chooses the workspace from its own ``workflowType`` setting instead (URL parameter,
else the browser's last choice, default GenAI), so etbench also prints a link that names it, and a *shared view*
(the experiment tag ``mlflow.sharedViewState.<key>``, the UI's own mechanism for a saved table layout) whose key
the link carries, so the runs table shows the runs' headline metrics instead of only the default attribute columns.
The view sorts by start time ("Created", newest first): the only order in which the UI nests child runs under their
parent, so each grid (its parent run, :mod:`etbench.tracking.grid_run`) is one collapsible row; a metric column
sorts on a click (the UI then lists every run flat).
``tests/test_mlflow_ui_browser.py`` checks all of this in a real browser.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
VIEW_KEY = "etbench"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MAX_VIEW_METRICS = 8
ORDER_BY = "attributes.start_time"  # the UI's "Created" column: it nests child runs only in this order
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui --host 127.0.0.1` serves
log = logging.getLogger(__name__)


def mark_model_training(client: Any, experiment: Any) -> None:
    """Tag an existing experiment as model training unless someone explicitly chose a kind for it."""
    kind = (experiment.tags or {}).get(EXPERIMENT_KIND_TAG, "")
    if kind == MODEL_TRAINING or (kind and not kind.endswith("inferred")):
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except Exception as e:  # a UI hint must never fail a run (e.g. a read-only or busy store); say so and go on
        log.warning("could not tag experiment %s as model training: %s", experiment.experiment_id, e)


def view_metrics(metric_keys: list[str]) -> list[str]:
    """The headline metrics of a run summary, in a stable order: best val/test scores, then the energy rise."""
    best = sorted(k for k in set(metric_keys) if k.startswith(("best/val/", "best/test/")))
    rise = [k for k in metric_keys if k == "energy/rise_fraction"][:1]
    return (best + rise)[:MAX_VIEW_METRICS]


def publish_runs_view(client: Any, experiment_id: str, metric_keys: list[str]) -> None:
    """Add ``metric_keys``' headline metrics to the experiment's shared runs-table view (written only on change)."""
    try:
        _publish(client, experiment_id, view_metrics(metric_keys))
    except Exception as e:  # the table layout is a convenience: never fail a finished run over it
        log.warning("could not store the runs-table view on experiment %s: %s", experiment_id, e)


def _publish(client: Any, experiment_id: str, new: list[str]) -> None:
    if not new:
        return
    tags = client.get_experiment(experiment_id).tags or {}
    try:
        state = json.loads(tags.get(VIEW_TAG, "{}"))
    except json.JSONDecodeError:
        state = {}
    columns = [c for c in state.get("selectedColumns", []) if isinstance(c, str)]
    wanted = (columns + [c for c in (f"metrics.`{k}`" for k in new) if c not in columns])[:2 * MAX_VIEW_METRICS]
    if wanted == columns and state.get("orderByKey") == ORDER_BY:  # (a view sorted by a metric is re-sorted)
        return
    state = {"selectedColumns": wanted, "orderByKey": ORDER_BY, "orderByAsc": False}
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))


def runs_page_url(experiment_id: str, base: str = DEFAULT_UI) -> str:
    """The experiment's runs table in the model-training workspace, with etbench's shared view."""
    return (f"{base.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}")


def ui_hint(tracking_uri: str, experiment: str) -> str:
    """How to browse ``experiment``: the `mlflow ui` command for a local store (none for a server) and the link."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if tracking_uri.startswith(("http://", "https://")):
        return runs_page_url(exp.experiment_id, tracking_uri) if exp else tracking_uri
    cmd = f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"
    return f"`{cmd}`, then open {runs_page_url(exp.experiment_id)}" if exp else f"`{cmd}`"
