"""Fixtures for tests and benchmarks alike (not benchmarks themselves, so not in ``etbench/bench/``).

:mod:`etbench.testing.report_store` generates schema-faithful MLflow stores of many finished runs: ``etbench bench
report`` times the report on them and the report tests read them. It expands a real grid (``etbench.sweep.grid``),
so it cannot live in ``etbench/tracking/`` (tracking imports nothing of etbench): this room may import ``sweep``,
``tracking`` and ``cluster``, and only ``bench`` and the tests import it.

:mod:`etbench.testing.loopback_cluster` runs a Ray cluster of loopback nodes that share no disk, an MLflow server
(behind a TCP proxy that can black-hole it) and the faults a real cluster has; :mod:`etbench.testing.chaos` reads
what a grid left behind (runs lost, duplicated, left open; per-epoch histories). The multi-node and chaos tests and
``etbench bench chaos`` use them.
"""
