"""Budget curves: the expected best of k configurations without replacement (Tang et al. 2020) against brute-force
enumeration of every subset and every order, its unbiasedness, and how failed, stopped and repeated searches enter."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from etbench.analysis.budget import budget_curves, budget_spread, expected_best, p_any_value

NAN = math.nan
VALUES = [0.41, 0.52, 0.39, 0.41, NAN, 0.47, NAN]  # ties and two configurations without a value


def _best(draw: tuple[float, ...], mode: str) -> float | None:
    finite = [x for x in draw if math.isfinite(x)]
    return (min if mode == "min" else max)(finite) if finite else None


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("k", range(1, len(VALUES) + 1))
def test_expected_best_equals_the_mean_over_every_subset(mode: str, k: int) -> None:
    bests = [b for s in itertools.combinations(VALUES, k) if (b := _best(s, mode)) is not None]
    mean, sd = expected_best(VALUES, k, mode)
    assert mean == pytest.approx(statistics.fmean(bests))  # conditioned on a subset with a value
    assert sd == pytest.approx(statistics.pstdev(bests), abs=1e-12)
    n_subsets = math.comb(len(VALUES), k)
    assert p_any_value(len(VALUES), 5, k) == pytest.approx(len(bests) / n_subsets)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_expected_best_is_the_mean_over_every_order_of_the_best_so_far(mode: str) -> None:
    values = [0.5, NAN, 0.3, 0.5, 0.4]
    for k in range(1, len(values) + 1):
        bests = [b for order in itertools.permutations(values) if (b := _best(order[:k], mode)) is not None]
        assert expected_best(values, k, mode)[0] == pytest.approx(statistics.fmean(bests))


def test_at_k_equal_n_it_is_the_observed_best_with_no_spread() -> None:
    assert expected_best(VALUES, len(VALUES), "min") == (0.39, 0.0)
    assert expected_best(VALUES, len(VALUES), "max") == (0.52, 0.0)
    assert expected_best([2.0, 2.0], 2, "max") == (2.0, 0.0)


def test_by_hand_and_edges() -> None:
    assert expected_best([1.0, 2.0, 3.0], 2, "min")[0] == pytest.approx(4 / 3)  # {1,2} {1,3} {2,3} → 1, 1, 2
    assert expected_best([1.0, 2.0, 3.0], 1, "min") == pytest.approx((2.0, math.sqrt(2 / 3)))
    assert math.isnan(expected_best([NAN, NAN], 1, "min")[0])
    for k in (0, 4):
        with pytest.raises(ValueError, match="1 ≤ k ≤ n"):
            expected_best([1.0, 2.0, 3.0], k, "min")


def test_unbiased_for_the_expected_best_of_k_fresh_draws() -> None:
    """Averaged over every sample of n i.i.d. draws from a small discrete distribution, the estimator equals the
    exact expected best of k fresh draws (Tang et al.'s point; the with-replacement estimator is biased)."""
    support, prob = [0.1, 0.5, 0.9], [0.5, 0.3, 0.2]
    n, k = 4, 3
    truth = sum(math.prod(prob[i] for i in idx) * max(support[i] for i in idx)
                for idx in itertools.product(range(3), repeat=k))
    mean = sum(math.prod(prob[i] for i in idx) * expected_best([support[i] for i in idx], k, "max")[0]
               for idx in itertools.product(range(3), repeat=n))
    assert mean == pytest.approx(truth, rel=1e-12)


def _runs(entries: list[tuple[str, float, str | None]], group: str = "et", search: str | None = None,
          start: int = 0) -> list[dict]:
    return [{"stage": "tune", "group": group, "model": group, "start": start + i, "status": st, "metric": "val/m",
             "mode": "min", "best/val/m": v, "stopped_early": cut, "search": search}
            for i, (st, v, cut) in enumerate(entries)]


def test_failed_and_stopped_runs_are_drawn_but_never_best() -> None:
    df = pd.DataFrame(_runs([("FINISHED", 0.5, None), ("FAILED", NAN, None), ("FINISHED", 0.2, "asha at epoch 5"),
                             ("FINISHED", 0.3, None)]))
    c = budget_curves(df)
    assert list(c["drawn"]) == ["full", "no value", "stopped early", "full"]
    assert list(c["best_so_far"]) == [0.5, 0.5, 0.5, 0.3]  # the truncated 0.2 is never the best
    assert c["expected_best"].iloc[0] == pytest.approx(0.4)  # one draw with a value: 0.5 or 0.3
    assert list(c["expected_best"]) == pytest.approx([expected_best([0.5, NAN, NAN, 0.3], k, "min")[0]
                                                      for k in range(1, 5)])
    assert c["expected_best"].iloc[3] == 0.3
    assert list(c["p_any_value"]) == pytest.approx([0.5, 5 / 6, 1.0, 1.0])
    assert set(c["search"]) == {"-"}  # no search-seed tag: one search


def test_two_search_seeds_give_one_curve_each_and_their_spread() -> None:
    a = _runs([("FINISHED", 0.5, None), ("FINISHED", 0.3, None), ("FINISHED", 0.4, None)], search="0")
    b = _runs([("FINISHED", 0.2, None), ("FINISHED", 0.6, None)], search="1", start=10)
    solo = _runs([("FINISHED", 0.1, None), ("FINISHED", 0.2, None)], group="vit")
    c = budget_curves(pd.DataFrame(a + b + solo))
    assert sorted(c.groupby(["group", "search"]).size().items()) == [(("et", "0"), 3), (("et", "1"), 2),
                                                                      (("vit", "-"), 2)]
    s = budget_spread(c)
    assert list(s["group"]) == ["et", "et"] and list(s["configurations"]) == [1, 2]  # k = 3: one search only
    e0 = [expected_best([0.5, 0.3, 0.4], k, "min")[0] for k in (1, 2)]
    e1 = [expected_best([0.2, 0.6], k, "min")[0] for k in (1, 2)]
    assert list(s["expected_mean"]) == pytest.approx([(x + y) / 2 for x, y in zip(e0, e1, strict=True)])
    assert list(s["expected_min"]) == pytest.approx([min(x, y) for x, y in zip(e0, e1, strict=True)])
    assert list(s["expected_max"]) == pytest.approx([max(x, y) for x, y in zip(e0, e1, strict=True)])
    assert list(s["best_so_far_min"]) == [0.2, 0.2] and list(s["best_so_far_max"]) == [0.5, 0.3]


def test_tuning_report_draws_budget_figures_for_one_and_several_searches(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from etbench.analysis import tuning_report

    rows = _runs([("FINISHED", 0.5, None), ("FINISHED", 0.4, "asha at epoch 5")], search="0")
    rows += _runs([("FINISHED", 0.45, None), ("FAILED", NAN, None)], search="1", start=5)
    rows += _runs([("FINISHED", 0.3, None), ("FINISHED", 0.35, None)], group="vit")
    rows += [{"stage": "final", "group": g, "model": g, "dataset": "d", "status": "FINISHED", "metric": "val/m",
              "mode": "min", "best/val/m": 0.4, "best/test/m": 0.41, "params": {"train.lr": 0.01},
              "tuned_from": "r", "start": 20 + s, "seed": s} for g in ("et", "vit") for s in range(2)]
    df = pd.DataFrame(rows).assign(lr=0.01)
    df["dataset"] = "d"
    monkeypatch.setattr(tuning_report, "tuned_runs", lambda client, experiment: df)
    rep = tuning_report.write_tuning_report(None, "x", tmp_path)
    assert rep is not None and (tmp_path / "figures" / "tuning_budget.png").stat().st_size > 0
    spread = pd.read_csv(tmp_path / "figures" / "tuning_budget_spread.csv")
    assert list(spread["group"]) == ["et", "et"] and list(spread["searches"]) == [2, 2]
    assert "Tang et al. 2020" in rep.section


def test_sensitivity_marks_only_the_runs_asha_stopped() -> None:
    from etbench.analysis.tuning_report import sensitivity

    df = pd.DataFrame([  # as tuned_runs builds it: the tag's text, or None (NaN once pandas holds the column)
        {"stage": "tune", "group": "et", "model": "et", "status": "FINISHED", "metric": "val/m", "lr": 0.01,
         "best/val/m": 0.4, "stopped_early": None},
        {"stage": "tune", "group": "et", "model": "et", "status": "FINISHED", "metric": "val/m", "lr": 0.02,
         "best/val/m": 0.5, "stopped_early": "asha at epoch 5"}])
    assert list(sensitivity(df)["stopped_early"]) == [False, True]
