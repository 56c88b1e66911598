"""Results tables (mean ± 95% CI per grid cell, costs beside) and ET-vs-baseline paired comparisons.

Usage: python analysis/main_table.py --experiment GRID [--tracking-uri URI] --out DIR [--metric NAME]
"""

from __future__ import annotations

from pathlib import Path

from etbench.analysis import scripting, tables
from etbench.analysis.figures import summary_over
from etbench.analysis.references import load_references

REFERENCES = Path(__file__).with_name("reference_results.yaml")


def main() -> None:
    args = scripting.parser(__doc__.splitlines()[0]).parse_args()
    loaded = scripting.load(args)
    refs = load_references(REFERENCES)
    for _task, runs, metrics in loaded.tasks():
        for over in ("seed", "split") if summary_over(runs) == "split" else ("seed",):
            made = tables.results_tables(runs, metrics, loaded.table.axes, over=over, references=refs)
            made += tables.comparison_tables(runs, metrics, loaded.table.axes, over=over)
            for t in made:
                for path in tables.write_table(t, loaded.out / "tables"):
                    print(f"wrote {path}")
                print(tables.to_markdown(t))


if __name__ == "__main__":
    main()
