"""The budget curve's expected best of k configurations (Dodge et al. 2019) against brute-force enumeration."""

from __future__ import annotations

import itertools
import math
import statistics

import pandas as pd
import pytest

from etbench.analysis.tuning_report import budget_curves, expected_best


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_expected_best_equals_the_mean_over_every_ordered_draw(mode: str, k: int) -> None:
    values = [0.41, 0.52, 0.39, 0.47]
    pick = min if mode == "min" else max
    bests = [pick(draw) for draw in itertools.product(values, repeat=k)]  # all n^k equally likely draws
    mean, sd = expected_best(values, k, mode)
    assert mean == pytest.approx(statistics.fmean(bests))
    assert sd == pytest.approx(statistics.pstdev(bests))


def test_expected_best_by_hand_and_edges() -> None:
    assert expected_best([1.0, 2.0, 3.0], 2, "min")[0] == pytest.approx(14 / 9)  # 5/9·1 + 3/9·2 + 1/9·3
    assert expected_best([1.0, 2.0, 3.0], 1, "min") == pytest.approx((2.0, math.sqrt(2 / 3)))
    assert math.isnan(expected_best([], 3, "min")[0])


def test_a_configuration_without_a_value_is_drawn_but_never_best() -> None:
    values = [0.5, math.nan, 0.3]
    draws = [d for d in itertools.product(values, repeat=2) if any(math.isfinite(x) for x in d)]
    bests = [min(x for x in d if math.isfinite(x)) for d in draws]  # conditioned on one draw with a value
    assert expected_best(values, 2, "min") == pytest.approx((statistics.fmean(bests), statistics.pstdev(bests)))


def test_budget_curve_of_a_search_with_a_failed_run() -> None:
    df = pd.DataFrame([
        {"stage": "tune", "group": "et", "model": "et", "start": i, "status": st, "metric": "val/m", "mode": "min",
         "best/val/m": v}
        for i, (st, v) in enumerate([("FINISHED", 0.5), ("FAILED", math.nan), ("FINISHED", 0.3)])])
    c = budget_curves(df)
    assert list(c["best_so_far"]) == [0.5, 0.5, 0.3]
    assert c["expected_best"].iloc[0] == pytest.approx(0.4)  # one draw: 0.5 or 0.3 (the failed one has none)
    assert c["expected_best"].iloc[2] == pytest.approx(expected_best([0.5, math.nan, 0.3], 3, "min")[0])
    assert c["expected_best"].iloc[2] < c["expected_best"].iloc[1] < c["expected_best"].iloc[0]


def test_sensitivity_marks_only_the_runs_asha_stopped() -> None:
    from etbench.analysis.tuning_report import sensitivity

    df = pd.DataFrame([  # as tuned_runs builds it: the tag's text, or None (NaN once pandas holds the column)
        {"stage": "tune", "group": "et", "model": "et", "status": "FINISHED", "metric": "val/m", "lr": 0.01,
         "best/val/m": 0.4, "stopped_early": None},
        {"stage": "tune", "group": "et", "model": "et", "status": "FINISHED", "metric": "val/m", "lr": 0.02,
         "best/val/m": 0.5, "stopped_early": "asha at epoch 5"}])
    assert list(sensitivity(df)["stopped_early"]) == [False, True]
