"""Figure: E, E_att, E_hn vs descent step t per ablation value (ET runs' energy traces or energy/* metrics).

Usage: python analysis/energy_descent.py --experiment GRID [--tracking-uri URI] --out DIR [--model et]
"""

from __future__ import annotations

from etbench.analysis import scripting
from etbench.analysis.cache import energy_frame
from etbench.analysis.descent import energy_figures


def main() -> None:
    p = scripting.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="et", help="model whose energy descent to plot")
    args = p.parse_args()
    loaded = scripting.load(args)
    runs, axes = loaded.table.runs, loaded.table.axes
    keep = ["dataset", "protocol", "model", "seed", "split", *axes]
    energy = energy_frame(runs[runs["model"] == args.model], loaded.cache, keep=keep)
    scripting.save_all(energy_figures(energy, axes), loaded.out / "figures")


if __name__ == "__main__":
    main()
