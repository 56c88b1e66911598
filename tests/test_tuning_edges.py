"""Issue 27.8: selected values at the edge of their search range are named in the tuned table."""

from __future__ import annotations

from etbench.analysis.tuning_edges import edge_note, edge_notes, parse_space
from etbench.sweep.tuning import SearchDim, space_json

LR = {"distribution": "loguniform", "low": 1e-3, "high": 0.1}


def test_edges_of_each_kind_of_dimension() -> None:
    # log-range [1e-3, 0.1] spans 2 decades: the top 10 % starts at 10^(-3 + 1.8) = 0.0631
    assert edge_note("train.lr", 0.07, LR) == "lr=0.07 in the top 10% of its log-range [0.001, 0.1]"
    assert edge_note("train.lr", 0.06, LR) is None
    assert edge_note("train.lr", 0.00125, LR) == "lr=0.00125 in the bottom 10% of its log-range [0.001, 0.1]"
    uniform = {"distribution": "uniform", "low": 0.0, "high": 1.0}
    assert edge_note("model.et.alpha", 0.95, uniform) == "alpha=0.95 in the top 10% of its range [0, 1]"
    assert edge_note("model.et.alpha", 0.5, uniform) is None
    randint = {"distribution": "randint", "low": 1, "high": 3}
    assert edge_note("model.layers", 3, randint) == "layers=3 at the top of [1, 3]"
    assert edge_note("model.layers", 2, randint) is None
    three = {"distribution": "choice", "values": [0.0, 1e-5, 1e-4]}
    assert edge_note("train.weight_decay", 1e-4, three) == "weight_decay=0.0001 the largest of [0, 1e-05, 0.0001]"
    assert edge_note("train.weight_decay", 1e-5, three) is None
    assert edge_note("model.hidden", 64, {"distribution": "choice", "values": [32, 64]}) is None  # 2 values: no flag
    assert edge_note("model.et.init", "width", {"distribution": "choice", "values": ["spec", "width"]}) is None


def test_the_tag_written_by_the_sweep_reads_back() -> None:
    tag = space_json({"train.lr": SearchDim(**LR), "model.hidden": SearchDim(distribution="choice",
                                                                               values=[16, 32, 64])})
    space = parse_space(tag)
    assert space is not None
    assert edge_notes({"train.lr": 0.09, "model.hidden": 32}, space) == \
        "lr=0.09 in the top 10% of its log-range [0.001, 0.1]"
    assert edge_notes({"train.lr": 0.09, "model.hidden": 64}, space) == \
        "hidden=64 the largest of [16, 32, 64]; lr=0.09 in the top 10% of its log-range [0.001, 0.1]"
    assert edge_notes({"train.lr": 0.01}, space) == ""
    assert parse_space(None) is None and parse_space("{not json") is None
    assert edge_notes({"train.lr": 0.09}, None) == "(space not recorded)"
