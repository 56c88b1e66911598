"""The report's width-scaling view (etbench.analysis.scaling): fitted log-log slopes against known power laws, the
Pareto front per panel against a hand-computed set, the CSV beside each figure naming the runs' config hashes, no
figure without a width axis, and the "needs ≥ 4 widths" row.

Runs are a generated DataFrame (no MLflow): 2 families × 4 widths × 2 seeds whose test MSE is exactly
A · C^alpha in training FLOPs C = 3 · fwd FLOPs/sample · samples seen (the two seeds scale it by 1 ± 2 %, so the
per-width mean is the power law itself).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from etbench.analysis import scaling
from etbench.analysis.html_report import write_html_report
from etbench.analysis.report import ReportResult, _scaling, _write_manifest
from etbench.analysis.stats import DEFAULT_CI

METRIC = "best/test/mse_masked"
SAMPLES = 1000.0
#: family → (fwd FLOPs per sample = k · D², A, alpha, params(D), train seconds(D))
FAMILIES = {
    "et": (10.0, 10.0, -0.3, lambda d: float(d), lambda d: float(d)),
    "vit": (30.0, 40.0, -0.5, lambda d: 10.0 * d * d, lambda d: 2.0 * d),
}
WIDTHS = (16, 32, 64, 128)
#: how far a learning rate scales a family's MSE (validation and test alike): the ET is best at 1e-3, the ViT at 2e-3
LR_PENALTY = {"et": lambda lr: lr / 1e-3, "vit": lambda lr: 2e-3 / lr}


def _runs(widths: tuple[int, ...] = WIDTHS, width_axis: str = "axis.model.dim", lrs: tuple[float, ...] = (1e-3,)
          ) -> pd.DataFrame:
    rows = []
    for model, (k, a, alpha, params, seconds) in FAMILIES.items():
        for d, lr in ((d, lr) for d in widths for lr in lrs):
            flops = 3 * k * d * d * SAMPLES
            for seed, wobble in ((0, 1.02), (1, 0.98)):
                suffix = "" if len(lrs) == 1 else f"-{lr}"
                rows.append({
                    "run_id": f"{model}-{d}-{seed}{suffix}", "task": "image", "model": model, "dataset": "digits",
                    "protocol": "masked-completion", "seed": seed, "split": -1, "paper_comparable": False,
                    "config_hash": f"h-{model}-{d}-{seed}{suffix}", width_axis: d, "axis.train.lr": lr,
                    "axis.model.memories": 4 * d if model == "et" else np.nan,
                    f"metrics.{METRIC}": a * flops**alpha * wobble * LR_PENALTY[model](lr),
                    "metrics.best/val/mse_masked": a * flops**alpha * LR_PENALTY[model](lr),
                    "metrics.cost/flops_per_sample": k * d * d, "metrics.cost/samples_seen": SAMPLES,
                    "metrics.cost/params": params(d), "metrics.cost/train_s": seconds(d),
                    "metrics.cost/wall_s": seconds(d) + 5.0})
    return pd.DataFrame(rows)


def _axes(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c.startswith("axis.")]


def _dominated(costs: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Oracle, lower is better: a point is off the front when another costs no more and scores strictly better,
    or costs strictly less and scores as well."""
    return np.array([any((costs[j] <= costs[i] and means[j] < means[i]) or
                         (costs[j] < costs[i] and means[j] <= means[i]) for j in range(len(costs)) if j != i)
                     for i in range(len(costs))])


def test_fitted_slopes_match_the_power_laws_and_fronts_match_by_hand() -> None:
    runs = _runs()
    made = scaling.scaling_figures(runs, METRIC, _axes(runs))
    try:
        assert [name for name, _ in made.figures.made] == ["scaling_digits_masked-completion_mse_masked"]
    finally:
        for _, fig in made.figures.made:
            plt.close(fig)
    assert made.fit is not None
    fit = made.fit.data.set_index(["model", "x"])
    # metric = A · C^alpha: slope alpha vs FLOPs; vs params: et's params ∝ D (C ∝ D²) → 2·alpha, vit's ∝ D² → alpha
    for model, x, slope in (("et", "train_flops", -0.3), ("vit", "train_flops", -0.5), ("et", "params", -0.6),
                            ("vit", "params", -0.5), ("et", "train_s", -0.6), ("vit", "train_s", -1.0)):
        row = fit.loc[(model, x)]
        assert row["slope"] == pytest.approx(slope, abs=1e-9)
        assert row["se"] == pytest.approx(0.0, abs=1e-6) and row["n_widths"] == 4 and row["note"] == ""
    display = made.fit.display
    assert display.loc[(display["model"] == "et") & (display["x"] == "training FLOPs (≈ 3 × fwd × samples)"),
                       "slope ± SE"].item().startswith("-0.3 ± ")

    name, points = made.points[0]
    assert name == "scaling_digits_masked-completion_mse_masked"
    assert len(points) == 8 and set(points["n"]) == {2}
    key = points["model"] + "@" + points["width"].astype(int).astype(str)
    # by hand: vit beats et at every FLOP count and time from its smallest width on; only et@16 is cheaper than
    # all of vit. By parameters (et's grow as D, vit's as 10 D²) every et width is cheaper than vit@16.
    expected = {"train_flops": {"et@16", "vit@16", "vit@32", "vit@64", "vit@128"},
                "train_s": {"et@16", "vit@16", "vit@32", "vit@64", "vit@128"},
                "params": set(key)}
    for x, members in expected.items():
        assert set(key[points[f"pareto_{x}"]]) == members, x
        oracle = ~_dominated(points[x].to_numpy(float), points["mean"].to_numpy(float))
        assert set(key[oracle]) == members, x
    flops = points.set_index(key)["train_flops"]
    assert flops["vit@64"] == pytest.approx(3 * 30 * 64 * 64 * SAMPLES)


def test_report_writes_the_points_csv_with_config_hashes_and_titles_the_figure(tmp_path) -> None:
    runs = _runs()
    result = ReportResult(out=tmp_path, index=tmp_path / "README.md", runs_csv=tmp_path / "runs.csv", n_runs=16,
                          metrics={})
    sections = _scaling(runs, METRIC, _axes(runs), DEFAULT_CI, tmp_path, result)
    stem = "scaling_digits_masked-completion_mse_masked"
    assert {p.name for p in result.figures} == {f"{stem}.png", f"{stem}.pdf", f"{stem}.csv"}
    assert all(p.exists() for p in result.figures)
    csv = pd.read_csv(tmp_path / "figures" / f"{stem}.csv")
    for row in csv.itertuples():
        assert row.config_hashes == f"h-{row.model}-{int(row.width)}-0;h-{row.model}-{int(row.width)}-1"
    assert (tmp_path / "tables" / "scaling_fit_digits_masked-completion_mse_masked.csv").exists()
    assert len(sections) == 1 and "fitted slope" in sections[0]
    assert "vs cost over width" in result.titles[stem]
    assert "samples seen from logged cost/samples_seen (16 runs)" in result.titles[stem]
    result.index.write_text("# r\n\n## Tables\n\n" + sections[0] + "\n## Figures\n")
    _write_manifest(tmp_path, "fp", result)
    page = write_html_report(tmp_path).read_text()
    assert stem in page and "vs cost over width" in page


def test_no_width_axis_draws_nothing_and_says_why() -> None:
    runs = _runs().rename(columns={"axis.model.dim": "axis.model.steps"})
    made = scaling.scaling_figures(runs, METRIC, _axes(runs))
    assert made.figures.made == [] and made.points == [] and made.fit is None
    assert any("no width axis" in s for s in made.figures.skipped)
    runs = _runs()
    runs.loc[runs["model"] == "vit", "axis.model.dim"] = np.nan  # a family without the width axis: said, not drawn
    made = scaling.scaling_figures(runs, METRIC, _axes(runs))
    for _, fig in made.figures.made:
        plt.close(fig)
    assert made.figures.skipped == ["scaling: digits/masked-completion: vit has no width axis value: not drawn"]
    assert set(made.points[0][1]["model"]) == {"et"}
    assert scaling.width_axes(["axis.model.et.dim", "axis.model.vit.width", "axis.model.hidden",
                               "axis.model.steps", "axis.model.dims"]) == \
        ["axis.model.et.dim", "axis.model.vit.width", "axis.model.hidden"]


def test_fewer_than_four_widths_gives_the_needs_row_and_a_fallback_flops_source() -> None:
    runs = _runs(widths=(16, 32, 64), width_axis="axis.model.vit.dim")
    runs = runs.drop(columns="metrics.cost/samples_seen").assign(**{"params.train.epochs": "10",
                                                                    "params.task.limit_train": "100"})
    made = scaling.scaling_figures(runs, METRIC, _axes(runs))
    for _, fig in made.figures.made:
        plt.close(fig)
    assert made.fit is not None
    assert set(made.fit.display["slope ± SE"]) == {scaling.NEEDS_WIDTHS} == {"needs ≥ 4 widths"}
    assert set(made.fit.data["n_widths"]) == {3}
    _, points = made.points[0]
    assert points["train_flops"].to_numpy() == pytest.approx(3 * points["width"] ** 2 * 1000 *
                                                              points["model"].map({"et": 10, "vit": 30}))


def test_fit_slope_standard_error_matches_the_closed_form() -> None:
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    y = 10.0 ** np.array([0.0, -0.5, -0.9, -1.6])
    slope, se, n, note = scaling.fit_slope(x, y)
    lx, ly = np.log10(x), np.log10(y)
    b = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    resid = ly - (ly.mean() + b * (lx - lx.mean()))
    assert slope == pytest.approx(b) == pytest.approx(-0.52)
    assert se == pytest.approx(np.sqrt((resid**2).sum() / 2 / ((lx - lx.mean()) ** 2).sum()))
    assert (n, note) == (4, "")
    assert scaling.fit_slope(x, -y)[3] == "values ≤ 0: no log-log fit"


def test_an_axis_zipped_to_the_width_follows_it_and_another_axis_splits_the_figures() -> None:
    runs = _runs(lrs=(1e-3, 2e-3))  # memories = 4 D on the ET (zipped): not a slice; lr: one figure per value
    made = scaling.scaling_figures(runs, METRIC, _axes(runs))
    for _, fig in made.figures.made:
        plt.close(fig)
    stem = "scaling_digits_masked-completion_mse_masked"
    assert [name for name, _ in made.points] == [f"{stem}_lr-0.001", f"{stem}_lr-0.002", f"{stem}_lr-best-val"]
    for _, points in made.points:
        assert len(points) == 8 and points["axis.model.memories"].dropna().tolist() == [64, 128, 256, 512]
    assert made.fit is not None
    fit = made.fit.data.set_index(["cell", "model", "x"])["slope"]
    assert fit[("lr=0.002", "vit", "train_flops")] == pytest.approx(-0.5) == fit[("lr=0.001", "vit", "train_flops")]
    # the best-lr figure: each family at the lr its validation MSE prefers, the runs' hashes saying which
    best = made.points[2][1]
    assert set(best.loc[best["model"] == "et", "axis.train.lr"]) == {1e-3}
    assert set(best.loc[best["model"] == "vit", "axis.train.lr"]) == {2e-3}
    assert all(h.endswith(f"-{lr}") for hashes, lr in zip(best["config_hashes"], best["axis.train.lr"], strict=True)
               for h in hashes.split(";"))
    assert fit[("lr=best-val", "et", "train_flops")] == pytest.approx(-0.3)
    assert made.figures.skipped == []


def test_short_tick_labels() -> None:
    assert [scaling.short_number(v) for v in (0.5, 20, 200, 5000, 12500, 3e6, 2e11, 1.5e12)] == [
        "0.5", "20", "200", "5k", "12.5k", "3M", "200G", "1.5T"]


@pytest.mark.parametrize("span", [(2e3, 1.3e5), (1.9e11, 2.5e12), (15.0, 230.0), (10.0, 1e7), (40.0, 60.0)])
def test_log_x_labels_fit_a_panel_of_the_double_column_figure(span: tuple[float, float]) -> None:
    """The spans of image_scaling.yaml's panels (parameters, FLOPs, seconds) and a wide and a narrow one: the x tick
    labels of three panels side by side neither overlap nor vanish (≥ 2 drawn per panel)."""
    from etbench.analysis import style

    fig, axs = style.new_figure(ncols=3, width=style.DOUBLE_COLUMN_IN, height=2.5)
    for ax in axs[0]:
        ax.plot(np.geomspace(*span, 5), np.linspace(0.4, 0.5, 5), "-o")
        scaling._log_x(ax)
    fig.draw_without_rendering()
    try:
        assert style.label_problems(fig) == []
        drawn = style._drawn_tick_labels(axs[0, 0].xaxis)
        assert len([t for t in drawn if t.get_text()]) >= 2, [t.get_text() for t in drawn]
    finally:
        plt.close(fig)


def test_width_labels_of_points_close_in_cost_do_not_collide(tmp_path) -> None:
    """Two families whose points nearly coincide on every panel (the situation of image_scaling's vit-tied at D 32
    and 48 in seconds): the report draws the figure without a layout warning, and every width label it shows sits
    inside its panel."""
    runs = _runs()
    runs.loc[runs["model"] == "vit", [f"metrics.{METRIC}", "metrics.best/val/mse_masked"]] = (
        runs.loc[runs["model"] == "et", [f"metrics.{METRIC}", "metrics.best/val/mse_masked"]].to_numpy() * 1.01)
    for cost in ("metrics.cost/flops_per_sample", "metrics.cost/params", "metrics.cost/train_s"):
        runs.loc[runs["model"] == "vit", cost] = runs.loc[runs["model"] == "et", cost].to_numpy() * 1.05
    result = ReportResult(out=tmp_path, index=tmp_path / "README.md", runs_csv=tmp_path / "runs.csv", n_runs=16,
                          metrics={})
    _scaling(runs, METRIC, _axes(runs), DEFAULT_CI, tmp_path, result)
    assert result.warnings == []
    fig, axs = plt.subplots(1, 1)
    try:
        for _ in range(8):  # eight labels on one spot: the four offsets take four, the rest are hidden
            axs.annotate("64", (1.0, 1.0), xytext=scaling.LABEL_OFFSETS[0], textcoords="offset points", fontsize=5)
        axs.set_xlim(0, 2), axs.set_ylim(0, 2)
        scaling._separate_width_labels(fig)
        shown = [t for t in axs.texts if t.get_visible()]
        assert sorted(t.xyann for t in shown) == sorted(scaling.LABEL_OFFSETS)
    finally:
        plt.close(fig)
