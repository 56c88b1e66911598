"""Per-epoch reports of a distributed (Ray Train) trial to the Ray Tune search that runs it.

A tuning trial with ``dist.workers > 1`` (or DeepSpeed) drives a ``TorchTrainer`` from inside its Tune function
trainable. Its ranks call ``ray.train.report`` after every epoch (:mod:`etbench.engine.worker`, with a checkpoint
only every ``train.checkpoint_every`` epochs); :class:`EpochsToTune`, a Ray Train ``UserCallback`` built on Ray
Tune's own ``TuneReportCallback`` (``ray.tune.integration.ray_train``), forwards rank 0's validation metric of each
epoch to the enclosing Tune session under the search's metric key, so ASHA sees the same per-epoch reports as from
a one-worker trial. The last epoch is not forwarded: the trial reports it with its outcome, as the one-worker path
does. When the scheduler stops the trial, Tune ends its actor and with it the Train controller and workers; the
stage driver closes the MLflow run from the epochs rank 0 wrote (``metrics.json``).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from etbench.engine.worker import EPOCH_REPORT_KEY


class EpochsToTune(TuneReportCallback):
    """Forward rank 0's per-epoch ``metric`` (e.g. ``val/mse_masked``) to Tune as ``key`` with ``epoch``."""

    def __init__(self, metric: str, key: str, config_hash: str, last_epoch: int) -> None:
        super().__init__()  # raises unless built inside a Tune session (the trial's process)
        self.metric, self.key, self.config_hash, self.last_epoch = metric, key, config_hash, last_epoch

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = metrics[0] if metrics else {}
        epoch, value = int(row.get("epoch", 0)), row.get(self.metric)
        if not row.get(EPOCH_REPORT_KEY) or epoch >= self.last_epoch:
            return
        if not isinstance(value, int | float) or not math.isfinite(value):
            return  # a non-finite epoch is never a result; a diverged run fails with its reason instead
        self._training_actor_item_queue.put({"epoch": epoch, self.key: float(value),
                                             "config_hash": self.config_hash})
