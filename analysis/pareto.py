"""Figure: headline metric vs FLOPs per sample and vs parameters (ET and baselines), with the Pareto front.

Usage: python analysis/pareto.py --experiment GRID [--tracking-uri URI] --out DIR [--metric NAME]
"""

from __future__ import annotations

from etbench.analysis import scripting
from etbench.analysis.figures import pareto_figures


def main() -> None:
    args = scripting.parser(__doc__.splitlines()[0]).parse_args()
    loaded = scripting.load(args)
    for _task, runs, metrics in loaded.tasks():
        scripting.save_all(pareto_figures(runs, metrics[0], loaded.table.axes), loaded.out / "figures")


if __name__ == "__main__":
    main()
