"""Figure: heatmap of the headline metric over memory size (model.memories or model.mem_ratio) × steps T.

Usage: python analysis/memory_heatmap.py --experiment GRID [--tracking-uri URI] --out DIR [--metric NAME]
"""

from __future__ import annotations

from etbench.analysis import scripting
from etbench.analysis.figures import memory_heatmaps


def main() -> None:
    args = scripting.parser(__doc__.splitlines()[0]).parse_args()
    loaded = scripting.load(args)
    for _task, runs, metrics in loaded.tasks():
        scripting.save_all(memory_heatmaps(runs, metrics[0], loaded.table.axes), loaded.out / "figures")


if __name__ == "__main__":
    main()
