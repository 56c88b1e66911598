"""``stats.summarize`` once per distinct input: a report asks for the same summary from several places (the
results table, the memory heatmaps, the steps and Pareto figures), each a pass of per-cell intervals.

The key is a hash of exactly the columns the summary reads (cell keys, split, seed and the metric) plus the
arguments, so a changed value can never be served from the cache; the last ``MAX_ENTRIES`` summaries are kept
and callers get a copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import pandas as pd

from etbench.analysis.metrics import column
from etbench.analysis.stats import DEFAULT_CI, CIConfig, summarize

MAX_ENTRIES = 16
_CACHE: OrderedDict[tuple[object, ...], pd.DataFrame] = OrderedDict()


def _key(runs: pd.DataFrame, metric: str, axes: Sequence[str], over: str, cfg: CIConfig, complete: bool
         ) -> tuple[object, ...]:
    cols = [c for c in ["dataset", "protocol", "model", *axes, "split", "seed", column(metric)] if c in runs.columns]
    digest = int(pd.util.hash_pandas_object(runs[cols], index=False).sum()) if len(runs) else 0
    return (digest, len(runs), tuple(cols), metric, tuple(axes), over, cfg, complete)


def cached_summarize(runs: pd.DataFrame, metric: str, axes: Sequence[str] = (), *, over: str = "seed",
                     cfg: CIConfig = DEFAULT_CI, complete: bool = True) -> pd.DataFrame:
    """:func:`etbench.analysis.stats.summarize`, computed once per distinct input."""
    key = _key(runs, metric, axes, over, cfg, complete)
    if key not in _CACHE:
        _CACHE[key] = summarize(runs, metric, axes, over=over, cfg=cfg, complete=complete)
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key].copy()
