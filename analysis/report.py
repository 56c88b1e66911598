"""Everything for one grid at once (tables, figures, run images, README) — what `etbench report` runs.

Usage: python analysis/report.py --experiment GRID [--tracking-uri URI] --out DIR [--metric NAME]
"""

from __future__ import annotations

from pathlib import Path

from etbench.analysis import scripting
from etbench.analysis.report import make_report

REFERENCES = Path(__file__).with_name("reference_results.yaml")


def main() -> None:
    args = scripting.parser(__doc__.splitlines()[0]).parse_args()
    make_report(args.experiment, args.tracking_uri, args.out, include_failed=args.include_failed,
                cache_dir=args.cache_dir, metrics=args.metric, references=REFERENCES)


if __name__ == "__main__":
    main()
