"""Budget curves of a hyper-parameter search: the best validation metric after k configurations.

The expected best of k configurations is the unbiased estimator of Tang et al. (2020, "Showing your work doesn't
always work"): the mean best of k configurations drawn *without* replacement from the n a search evaluated. The
with-replacement estimator of Dodge et al. (2019, "Show Your Work") re-draws the best configuration with
probability 1 − (1 − 1/n)^k < 1 even at k = n, which biases it; without replacement the curve reaches the
observed best exactly at k = n, so it says nothing beyond the configurations tried.

A configuration without a full-budget value is drawn but is never the best: a failed run (diverged, crashed) has
no value, and a run the scheduler stopped early (tag ``etbench.stopped_early``) has only a truncated score. The
scheduler stopped it for being behind at a rung, so this is exact if no stopped run would have become the best,
and pessimistic otherwise. Independent searches of one group (tag ``etbench.tune.search_seed``) get one curve each
and :func:`budget_spread` summarises them: their spread is what a different search seed changed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from etbench.tracking import schema as S

ONE_SEARCH = "-"  # the search of runs without a search-seed tag
FULL, STOPPED, NO_VALUE = "full", "stopped early", "no value"


def expected_best(values: list[float], k: int, mode: str) -> tuple[float, float]:
    """Mean and standard deviation of the best of ``k`` of the ``values`` drawn at random without replacement.

    With the n values ranked best first (NaN, no value, ranked last), the best of a k-subset is the value at rank
    i with probability C(n − 1 − i, k − 1) / C(n, k): the other k − 1 are drawn from the n − 1 − i below it. NaN
    entries are drawn like any other but are never the best; the result is conditioned on at least one of the k
    having a value (NaN when none can)."""
    n = len(values)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} configurations out of n = {n}: need 1 ≤ k ≤ n")
    v = sorted((x for x in values if math.isfinite(x)), reverse=(mode == "max"))
    weights = [math.comb(n - 1 - i, k - 1) for i in range(len(v))]
    some = sum(weights)  # = C(n, k) − C(n − m, k): subsets with at least one value
    if some == 0:
        return math.nan, math.nan
    p = [w / some for w in weights]
    mean = math.fsum(pi * vi for pi, vi in zip(p, v, strict=True))
    var = math.fsum(pi * (vi - mean) ** 2 for pi, vi in zip(p, v, strict=True))
    return mean, math.sqrt(max(var, 0.0))


def p_any_value(n: int, valued: int, k: int) -> float:
    """Probability that k of n configurations drawn without replacement include one of the ``valued``."""
    return 1.0 - math.comb(n - valued, k) / math.comb(n, k)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _entry(r: pd.Series, metric: str) -> tuple[str, float]:
    """How one tuning run enters a curve: full-budget value, stopped early (truncated), or no value."""
    if r["status"] != "FINISHED":
        return NO_VALUE, math.nan
    if isinstance(r.get("stopped_early"), str):  # the tag's text where set, NaN/None where absent
        return STOPPED, math.nan
    value = _float(r.get(f"best/{metric}"))
    return (FULL, value) if math.isfinite(value) else (NO_VALUE, math.nan)


def budget_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Per search (group × search seed), after k configurations in start order: the best full-budget validation
    value found so far, and the expected best of k over random orders of that search (:func:`expected_best`, its
    sd, and the probability that the k include a full-budget value at all). ``drawn`` says how the k-th run
    entered (full, stopped early, no value)."""
    tune = df[df["stage"] == S.STAGE_TUNE].sort_values("start")
    if "search" not in tune.columns:
        tune = tune.assign(search=ONE_SEARCH)
    tune = tune.assign(search=tune["search"].fillna(ONE_SEARCH).astype(str))
    rows = []
    for (gid, search), block in tune.groupby(["group", "search"], sort=True):
        metric, mode = str(block["metric"].iloc[0]), str(block["mode"].iloc[0])
        entries = [_entry(r, metric) for _, r in block.iterrows()]
        values = [v for _, v in entries]
        n, valued = len(values), sum(math.isfinite(v) for v in values)
        best = math.nan
        for k, ((_, r), (drawn, v)) in enumerate(zip(block.iterrows(), entries, strict=True), start=1):
            if math.isfinite(v) and (math.isnan(best) or (v < best if mode == "min" else v > best)):
                best = v
            mean, sd = expected_best(values, k, mode)
            rows.append({"group": gid, "search": search, "model": r["model"], "configurations": k, "drawn": drawn,
                         "best_so_far": best, "expected_best": mean, "expected_sd": sd,
                         "p_any_value": p_any_value(n, valued, k), "full_budget_runs": valued, "metric": metric})
    return pd.DataFrame(rows)


SPREAD_COLUMNS = ["group", "model", "configurations", "searches", "expected_mean", "expected_min", "expected_max",
                  "best_so_far_min", "best_so_far_max", "metric"]


def budget_spread(curves: pd.DataFrame) -> pd.DataFrame:
    """Per group with at least two searches and per k that two or more of them reached: the mean, min and max over
    searches of the expected best, and the range of their best so far (the spread a new search seed gives)."""
    rows = []
    if curves.empty:
        return pd.DataFrame(columns=SPREAD_COLUMNS)
    for (gid, k), block in curves.groupby(["group", "configurations"], sort=True):
        if block["search"].nunique() < 2:
            continue
        e, b = block["expected_best"], block["best_so_far"]
        rows.append({"group": gid, "model": block["model"].iloc[0], "configurations": k,
                     "searches": int(block["search"].nunique()), "expected_mean": e.mean(), "expected_min": e.min(),
                     "expected_max": e.max(), "best_so_far_min": b.min(), "best_so_far_max": b.max(),
                     "metric": block["metric"].iloc[0]})
    return pd.DataFrame(rows, columns=SPREAD_COLUMNS)


def draw_group(ax: Any, curves: pd.DataFrame, spread: pd.DataFrame, colour: str) -> None:
    """One group's budget curves on ``ax``. One search: its best so far (solid; x where the k-th run was stopped
    early) and the expected best ± sd over random orders (dashed, band). Several searches: each one's best so far
    (thin solid), the mean over searches of their expected best (dashed) and its range across searches (band)."""
    from matplotlib.ticker import MaxNLocator  # lazy: the curves themselves need no plotting library

    searches = list(curves.groupby("search", sort=True))
    for _, s in searches:
        ax.plot(s["configurations"], s["best_so_far"], color=colour, lw=1.5 if len(searches) == 1 else 0.8,
                alpha=1.0 if len(searches) == 1 else 0.6, marker="o" if len(searches) == 1 else None, ms=3)
        cut = s[s["drawn"] == STOPPED]
        ax.scatter(cut["configurations"], cut["best_so_far"], marker="x", color=colour, s=18)
    if len(searches) == 1:
        s = searches[0][1]
        mean, sd = s["expected_best"], s["expected_sd"]
        ax.plot(s["configurations"], mean, ls="--", color=colour)
        ax.fill_between(s["configurations"], mean - sd, mean + sd, color=colour, alpha=0.15)
    elif not spread.empty:
        ax.plot(spread["configurations"], spread["expected_mean"], ls="--", color=colour)
        ax.fill_between(spread["configurations"], spread["expected_min"], spread["expected_max"], color=colour,
                        alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k counts configurations
