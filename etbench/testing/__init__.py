"""Fixtures for tests and benchmarks alike (not benchmarks themselves, so not in ``etbench/bench/``).

:mod:`etbench.testing.report_store` generates schema-faithful MLflow stores of many finished runs: ``etbench bench
report`` times the report on them and the report tests read them. It expands a real grid (``etbench.sweep.grid``),
so it cannot live in ``etbench/tracking/`` (tracking imports nothing of etbench): this room may import ``sweep`` and
``tracking``, and only ``bench`` and the tests import it.
"""
