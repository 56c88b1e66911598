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


def _group_stats(frame: pd.DataFrame, value: str, keys: list[str], cfg: CIConfig) -> pd.DataFrame:
    """One row per distinct ``keys`` combination with the summary of ``value``."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *SUMMARY_COLUMNS])
    rows = []
    for key, group in frame.groupby(keys, dropna=False, sort=True):
        rows.append({**dict(zip(keys, key, strict=True)), **mean_ci(group[value].to_numpy(float), cfg)})
    return pd.DataFrame(rows)


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


def _test(ref: np.ndarray, base: np.ndarray, cfg: CIConfig) -> dict[str, float | int | str]:
    """Mean difference (ref − base) with its CI, paired effect size d_z, paired t-test p and Wilcoxon p (n ≥ 6).

    d_z = mean(diff) / sd(diff) (Cohen's d for paired samples); NaN when the differences do not vary.
    """
    diff = ref - base
    ci = mean_ci(diff, cfg)
    out: dict[str, float | int | str] = {
        "n": ci["n"],
        "mean_diff": ci["mean"],
        "std_diff": ci["std"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "interval": ci["interval"],
        "d_z": np.nan,
        "p_ttest": np.nan,
        "p_wilcoxon": np.nan,
    }
    if diff.size >= 2 and float(ci["std"]) > 1e-9 * abs(float(ci["mean"])):  # float noise is not a spread
        out["d_z"] = float(ci["mean"]) / float(ci["std"])
    if diff.size >= 2 and np.any(diff != 0):
        out["p_ttest"] = float(stats.ttest_rel(ref, base).pvalue)
        if diff.size >= 6:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["p_wilcoxon"] = float(stats.wilcoxon(ref, base).pvalue)
    return out


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


def decide(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Holm-adjust ``p_ttest`` over every row of ``table`` (one family) and set ``favours`` from it.

    ``favours`` names the better model (by each row's ``metric`` direction) only when the adjusted p < ``alpha``;
    otherwise "no difference shown" ("no test (n=…)" when fewer than two pairs exist).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must lie in (0, 1)")
    table = table.copy()
    table["p_holm"] = holm(table["p_ttest"].to_numpy(float)) if len(table) else np.array([], dtype=float)
    favours = []
    for _, row in table.iterrows():
        if int(row["n"]) < 2:
            favours.append(f"no test (n={int(row['n'])})")
        elif pd.notna(row["p_holm"]) and row["p_holm"] < alpha:
            better = (row["mean_diff"] > 0) == higher_is_better(str(row["metric"]))
            favours.append(str(row["reference"]) if better else str(row["baseline"]))
        else:
            favours.append(NO_DIFFERENCE)
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
    rows = []
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
            for key, group in pairs.groupby(keys, dropna=False, sort=True) if keys else [((), pairs)]:
                key = key if isinstance(key, tuple) else (key,)
                row = {"dataset": dataset, "protocol": protocol, **dict(zip(keys, key, strict=True))}
                row.update(reference=reference, baseline=baseline)
                row.update(_test(group["ref"].to_numpy(float), group["base"].to_numpy(float), cfg))
                rows.append(row)
    table = pd.DataFrame(rows, columns=[c for c in columns if c not in ("p_holm", "favours", "metric", "over")])
    table = decide(table.assign(metric=metric), alpha)
    return table.assign(over=over)[columns]
