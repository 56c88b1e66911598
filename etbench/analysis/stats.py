"""Aggregation over replicates and paired comparisons, never a bare mean.

Every summary carries mean, std (ddof = 1), n and a 95% confidence interval of the mean. The default interval
fits the n this suite has: Student t for n < 10, BCa bootstrap (``scipy.stats.bootstrap``) only from n = 10 (the
bootstrap distribution of a mean of two or three numbers has a handful of points; its interval means nothing),
and none below n = 3 (NaN; tables print "(n=1)" or "n=2: no reliable interval").

Seeds and splits are never pooled silently: a summary is either over seeds within each split (``over="seed"``,
split is a key column) or over splits of the per-split seed means (``over="split"``, n = number of splits).
Grid cells without a single run appear with n = 0.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from etbench.analysis.metrics import column, higher_is_better

SUMMARY_COLUMNS = ("mean", "std", "n", "ci_low", "ci_high", "interval")
OVER = ("seed", "split")


@dataclass(frozen=True)
class CIConfig:
    """How intervals are computed.

    ``method="auto"`` (default): Student t for ``n < bootstrap_min_n``, BCa bootstrap from it. ``"t"`` or a
    bootstrap method (``"BCa"``, ``"percentile"``, ``"basic"``) forces that interval at every n. Below
    ``reliable_min_n`` no interval is computed at all (NaN).
    """

    confidence: float = 0.95
    n_resamples: int = 9999
    method: str = "auto"
    seed: int = 0
    bootstrap_min_n: int = 10
    reliable_min_n: int = 3

    def __post_init__(self) -> None:
        allowed = ("auto", "BCa", "percentile", "basic", "t")
        if self.method not in allowed:
            raise ValueError(f"CIConfig.method {self.method!r} not one of {allowed}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"CIConfig.confidence {self.confidence} must lie in (0, 1)")
        if self.reliable_min_n < 2 or self.bootstrap_min_n < 2:
            raise ValueError(f"CIConfig.reliable_min_n ({self.reliable_min_n}) and bootstrap_min_n "
                             f"({self.bootstrap_min_n}) must be ≥ 2")

    def method_for(self, n: int) -> str:
        """The interval used for ``n`` values: "none" (n < reliable_min_n), "t" or a bootstrap method."""
        if n < self.reliable_min_n:
            return "none"
        if self.method == "auto":
            return "t" if n < self.bootstrap_min_n else "BCa"
        return self.method


DEFAULT_CI = CIConfig()


def mean_ci(values: Sequence[float] | np.ndarray, cfg: CIConfig = DEFAULT_CI) -> dict[str, float | int | str]:
    """mean, std, n, ci_low, ci_high and ``interval`` (the method used) of the non-NaN ``values``.

    The interval is NaN for n < ``cfg.reliable_min_n``. When every value is equal the interval is that value
    (each resample has the same mean; BCa and t are undefined).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = int(x.size)
    method = cfg.method_for(n)
    out: dict[str, float | int | str] = {"mean": np.nan, "std": np.nan, "n": n, "ci_low": np.nan,
                                         "ci_high": np.nan, "interval": method}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n < 2:
        return out
    out["std"] = float(x.std(ddof=1))
    if method == "none":
        return out
    if np.ptp(x) == 0:
        out["ci_low"] = out["ci_high"] = out["mean"]
    elif method == "t":
        low, high = stats.t.interval(cfg.confidence, n - 1, loc=x.mean(), scale=stats.sem(x))
        out["ci_low"], out["ci_high"] = float(low), float(high)
    else:
        res = stats.bootstrap(
            (x,),
            np.mean,
            confidence_level=cfg.confidence,
            n_resamples=cfg.n_resamples,
            method=method,
            rng=np.random.default_rng(cfg.seed),
        )
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def _check(runs: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in runs.columns]
    if missing:
        raise KeyError(f"run table lacks column(s) {missing}; has {sorted(runs.columns)}")


#: Bootstrap batches hold at most this many resampled values (rows × resamples × n), about 64 MiB of float64.
BOOTSTRAP_BATCH_VALUES = 8_000_000


def _row_means(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over the last axis, row by row of the first: each row reduces exactly as the 1-D bootstrap's
    ``np.mean`` does (numpy sums a 3-D block's last axis in another order, which moves the last bit)."""
    if axis != -1:
        raise ValueError(f"_row_means reduces the last axis only (axis={axis})")
    return np.stack([np.mean(row, axis=-1) for row in x])


def mean_ci_many(samples: Sequence[np.ndarray], cfg: CIConfig = DEFAULT_CI) -> pd.DataFrame:
    """:func:`mean_ci` of every sample (rows in order, columns ``SUMMARY_COLUMNS``), computed in batches.

    Samples of equal size (after dropping NaN) are stacked into one matrix and reduced along its rows: the same
    numpy reductions, one scipy call (``t.interval``, ``sem``, ``bootstrap`` with ``axis=-1``) per size instead of
    one per sample. Row reductions of a C-ordered matrix sum exactly like the 1-D call, and a bootstrap of k rows
    draws the resample indices once for all rows from the same seeded generator that each single call would
    reseed (its statistic reduces row by row, :func:`_row_means`), so every number equals the per-sample
    :func:`mean_ci` bit for bit (tested).
    """
    clean = [x[~np.isnan(x)] for x in (np.asarray(v, dtype=float) for v in samples)]
    n = np.array([x.size for x in clean], dtype=int)
    mean, std, low, high = (np.full(len(clean), np.nan) for _ in range(4))
    for size in np.unique(n[n > 0]):
        idx = np.flatnonzero(n == size)
        block = np.stack([clean[i] for i in idx])
        mean[idx] = block.mean(axis=1)
        if size < 2:
            continue
        std[idx] = block.std(axis=1, ddof=1)
        method = cfg.method_for(int(size))
        if method == "none":
            continue
        flat = np.ptp(block, axis=1) == 0
        low[idx[flat]] = high[idx[flat]] = mean[idx[flat]]
        spread, rows = idx[~flat], block[~flat]
        if not spread.size:
            continue
        if method == "t":
            lo, hi = stats.t.interval(cfg.confidence, size - 1, loc=rows.mean(axis=1), scale=stats.sem(rows, axis=1))
            low[spread], high[spread] = lo, hi
            continue
        per_batch = max(1, BOOTSTRAP_BATCH_VALUES // (cfg.n_resamples * int(size)))
        for start in range(0, len(spread), per_batch):
            res = stats.bootstrap((rows[start:start + per_batch],), _row_means, confidence_level=cfg.confidence,
                                  n_resamples=cfg.n_resamples, method=method, axis=-1, vectorized=True,
                                  rng=np.random.default_rng(cfg.seed))
            low[spread[start:start + per_batch]] = res.confidence_interval.low
            high[spread[start:start + per_batch]] = res.confidence_interval.high
    interval = [cfg.method_for(int(k)) for k in n]
    return pd.DataFrame({"mean": mean, "std": std, "n": n, "ci_low": low, "ci_high": high,
                         "interval": interval}, columns=list(SUMMARY_COLUMNS))


def _grouped_values(frame: pd.DataFrame, value: str, keys: list[str]) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The distinct ``keys`` rows (sorted, NaN keys kept, as ``groupby(sort=True, dropna=False)`` orders them) and
    each group's ``value`` array in the frame's row order."""
    codes = frame.groupby(keys, dropna=False, sort=True).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    values = frame[value].to_numpy(float)[order]
    first = frame[keys].iloc[order[starts]]
    # rebuilt from Python rows so the key columns get the dtypes a frame of group keys always had (a nullable
    # integer axis with missing values comes out as object, as the per-group loop produced it)
    key_rows = pd.DataFrame([dict(zip(keys, row, strict=True)) for row in first.itertuples(index=False)],
                            columns=keys)
    return key_rows, np.split(values, starts[1:])


def _group_stats(frame: pd.DataFrame, value: str, keys: list[str], cfg: CIConfig) -> pd.DataFrame:
    """One row per distinct ``keys`` combination with the summary of ``value``."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *SUMMARY_COLUMNS])
    key_rows, samples = _grouped_values(frame, value, keys)
    return pd.concat([key_rows, mean_ci_many(samples, cfg)], axis=1)


def grid_cells(runs: pd.DataFrame, axes: Sequence[str], with_split: bool = True) -> pd.DataFrame:
    """The grid cells the experiment implies, also those with no run at all.

    Within each (dataset, protocol), a model's cells are the product of the values, over all models, of every
    axis that model has (an ET-only axis such as ``model.terms`` does not multiply a baseline's cells), and of
    the splits.
    """
    keys = ["dataset", "protocol", "model", *axes] + (["split"] if with_split else [])
    cells: list[dict[str, object]] = []
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        values = {a: sorted(block[a].dropna().unique()) for a in axes}
        splits = sorted(block["split"].dropna().unique()) if with_split else [None]
        for model, rows in block.groupby("model", sort=True):
            own = [a for a in axes if rows[a].notna().any()]
            for combo in itertools.product(*(values[a] for a in own), splits):
                cell: dict[str, object] = {"dataset": dataset, "protocol": protocol, "model": model}
                cell.update({a: pd.NA for a in axes})
                cell.update(dict(zip(own, combo[:-1], strict=True)))
                if with_split:
                    cell["split"] = combo[-1]
                cells.append(cell)
    frame = pd.DataFrame(cells, columns=keys)
    for a in [*axes, "split"] if with_split else axes:
        if a in runs.columns:
            frame[a] = frame[a].astype(runs[a].dtype)
    return frame


def summarize(
    runs: pd.DataFrame,
    metric: str,
    axes: Sequence[str] = (),
    *,
    over: str = "seed",
    cfg: CIConfig = DEFAULT_CI,
    complete: bool = True,
) -> pd.DataFrame:
    """Summary of ``metric`` per grid cell (dataset, protocol, model, axes[, split]).

    ``over="seed"``: statistics over seeds, one row per split. ``over="split"``: statistics over splits of the
    per-split seed means (n = number of splits). ``complete`` adds the cells with no run as n = 0 rows.
    """
    if over not in OVER:
        raise ValueError(f"over={over!r}; allowed: {OVER}")
    value = column(metric)
    cell = ["dataset", "protocol", "model", *axes]
    _check(runs, [*cell, "split", "seed"])
    present = runs if value in runs.columns else runs.assign(**{value: np.nan})
    if over == "seed":
        keys = [*cell, "split"]
        table = _group_stats(present, value, keys, cfg)
    else:
        keys = cell
        per_split = present.groupby([*cell, "split"], dropna=False, sort=True)[value].mean().reset_index()
        table = _group_stats(per_split, value, keys, cfg)
    if complete and not runs.empty:
        grid = grid_cells(runs, list(axes), with_split=over == "seed")
        table = grid.merge(table, on=keys, how="left")
        table["n"] = table["n"].fillna(0)
    table["n"] = table["n"].astype(int)
    return table.assign(metric=metric, over=over).reset_index(drop=True)


def _pairs(runs: pd.DataFrame, value: str, axes: Sequence[str], reference: str, baseline: str) -> pd.DataFrame:
    """Reference and baseline values matched on dataset, protocol, split, seed and every axis both have."""
    ref = runs[(runs["model"] == reference) & runs[value].notna()]
    base = runs[(runs["model"] == baseline) & runs[value].notna()]
    both = [a for a in axes if ref[a].notna().any() and base[a].notna().any()]
    ref_only = [a for a in axes if a not in both and ref[a].notna().any()]
    base_only = [a for a in axes if a not in both and base[a].notna().any()]
    on = ["dataset", "protocol", "split", "seed", *both]
    left = ref[[*on, *ref_only, value]].rename(columns={value: "ref"})
    right = base[[*on, *base_only, value]].rename(columns={value: "base"})
    merged = left.merge(right, on=on, how="inner")
    return merged.assign(baseline=baseline)


def _tests(refs: Sequence[np.ndarray], bases: Sequence[np.ndarray], cfg: CIConfig) -> pd.DataFrame:
    """Per (ref, base) pair of arrays, one row each: mean difference (ref − base) with its CI, paired effect size
    d_z = mean(diff) / sd(diff) (Cohen's d for paired samples; NaN when the differences do not vary), paired
    t-test p (n ≥ 2, some difference ≠ 0) and Wilcoxon p (n ≥ 6). Batched: the intervals through
    :func:`mean_ci_many`, the paired t-tests as one ``ttest_rel(axis=1)`` per pair count (the same numbers as one
    call per pair: tested). Wilcoxon stays one call per pair, since scipy decides exact vs normal approximation
    once for a whole batch (ties or zeros in any row switch every row)."""
    diffs = [r - b for r, b in zip(refs, bases, strict=True)]
    ci = mean_ci_many(diffs, cfg)
    n = np.array([d.size for d in diffs], dtype=int)
    mean, std = ci["mean"].to_numpy(float), ci["std"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = (n >= 2) & (std > 1e-9 * np.abs(mean))  # float noise is not a spread
        d_z = np.where(spread, mean / std, np.nan)
    p_t, p_w = np.full(len(diffs), np.nan), np.full(len(diffs), np.nan)
    testable = np.array([d.size >= 2 and bool(np.any(d != 0)) for d in diffs], dtype=bool)
    for size in np.unique(n[testable]):
        idx = np.flatnonzero(testable & (n == size))
        p_t[idx] = stats.ttest_rel(np.stack([refs[i] for i in idx]), np.stack([bases[i] for i in idx]), axis=1).pvalue
        if size >= 6:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p_w[idx] = [float(stats.wilcoxon(refs[i], bases[i]).pvalue) for i in idx]
    return pd.DataFrame({"n": ci["n"], "mean_diff": mean, "std_diff": std, "ci_low": ci["ci_low"],
                         "ci_high": ci["ci_high"], "interval": ci["interval"], "d_z": d_z, "p_ttest": p_t,
                         "p_wilcoxon": p_w})


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries (no test) are not part of the family and stay NaN.

    With the m finite p sorted ascending, p_(i) becomes max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


NO_DIFFERENCE = "no difference shown"
#: "favours" of a secondary-metric row: its p is shown raw, it is no hypothesis of the table's Holm family.
SECONDARY = "descriptive (secondary metric)"


def decide(table: pd.DataFrame, alpha: float = 0.05, family: Sequence[bool] | None = None) -> pd.DataFrame:
    """Holm-adjust ``p_ttest`` over the rows of ``table`` in ``family`` (all rows when ``None``) and set
    ``favours`` from it.

    ``favours`` names the better model (by each row's ``metric`` direction) only when the adjusted p < ``alpha``;
    otherwise "no difference shown" ("no test (n=…)" when fewer than two pairs exist). Rows outside ``family``
    (secondary metrics) get no adjusted p and no verdict: they are descriptive.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must lie in (0, 1)")
    table = table.copy()
    tested = np.ones(len(table), dtype=bool) if family is None else np.asarray(family, dtype=bool)
    if tested.shape != (len(table),):
        raise ValueError(f"family has {tested.size} entries for a table of {len(table)} rows")
    p_raw = table["p_ttest"].to_numpy(float) if len(table) else np.array([], dtype=float)
    table["p_holm"] = holm(np.where(tested, p_raw, np.nan))
    n = table["n"].to_numpy().astype(int)
    p_holm = table["p_holm"].to_numpy(float)
    higher = np.array([higher_is_better(str(m)) for m in table["metric"]], dtype=bool)
    better = (table["mean_diff"].to_numpy(float) > 0) == higher
    named = np.where(better, table["reference"].astype(str).to_numpy(object),
                     table["baseline"].astype(str).to_numpy(object))
    verdict = np.where(~np.isnan(p_holm) & (p_holm < alpha), named, NO_DIFFERENCE)
    favours = np.where(n < 2, np.array([f"no test (n={k})" for k in n], dtype=object),
                       np.where(tested, verdict, SECONDARY))
    table["favours"] = pd.Series(favours, index=table.index, dtype=object)
    return table


def compare(
    runs: pd.DataFrame,
    metric: str,
    axes: Sequence[str] = (),
    *,
    reference: str = "et",
    over: str = "seed",
    cfg: CIConfig = DEFAULT_CI,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """``reference`` vs every other model, paired by seed and split (and the axes both models have).

    ``over="seed"``: one comparison per split over the paired seeds. ``over="split"``: seed means per split are
    paired, the test runs over splits. ``mean_diff`` is reference − baseline; ``p_holm`` is the paired-t p
    Holm-adjusted over the rows returned (re-adjust with :func:`decide` when several metrics form one table);
    ``favours`` names a model only when ``p_holm < alpha``.
    """
    if over not in OVER:
        raise ValueError(f"over={over!r}; allowed: {OVER}")
    value = column(metric)
    _check(runs, ["dataset", "protocol", "model", "split", "seed", *axes])
    split = ["split"] if over == "seed" else []
    columns = ["dataset", "protocol", *split, *axes, "reference", "baseline", "n", "mean_diff", "std_diff",
               "ci_low", "ci_high", "interval", "d_z", "p_ttest", "p_wilcoxon", "p_holm", "favours", "metric",
               "over"]
    if value not in runs.columns:
        return pd.DataFrame(columns=columns)
    rows: list[dict[str, object]] = []
    refs: list[np.ndarray] = []
    bases: list[np.ndarray] = []
    for (dataset, protocol), block in runs.groupby(["dataset", "protocol"], sort=True):
        if not (block["model"] == reference).any():
            continue
        for baseline in sorted(set(block["model"]) - {reference}):
            pairs = _pairs(block, value, axes, reference, baseline)
            cell = [a for a in axes if a in pairs.columns]
            if over == "split":
                pairs = pairs.groupby(["split", *cell], dropna=False)[["ref", "base"]].mean().reset_index()
                keys = cell
            else:
                keys = ["split", *cell]
            if pairs.empty:
                continue
            head = {"dataset": dataset, "protocol": protocol}
            if keys:
                key_rows, ref_groups = _grouped_values(pairs, "ref", keys)
                base_groups = _grouped_values(pairs, "base", keys)[1]
                rows += [{**head, **key, "reference": reference, "baseline": baseline}
                         for key in key_rows.to_dict("records")]
            else:
                ref_groups, base_groups = [pairs["ref"].to_numpy(float)], [pairs["base"].to_numpy(float)]
                rows.append({**head, "reference": reference, "baseline": baseline})
            refs += ref_groups
            bases += base_groups
    tested = pd.concat([pd.DataFrame(rows), _tests(refs, bases, cfg)], axis=1) if rows else pd.DataFrame()
    table = pd.DataFrame(tested, columns=[c for c in columns if c not in ("p_holm", "favours", "metric", "over")])
    table = decide(table.assign(metric=metric), alpha)
    return table.assign(over=over)[columns]
