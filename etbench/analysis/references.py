"""Published reference numbers (``analysis/reference_results.yaml``) to print beside etbench's own.

File layout (``yaml.safe_load``)::

    references:
      - source: "Hoover et al. 2023, Table N"   # where the number comes from (required)
        dataset: yelpchi                          # etbench dataset name (required)
        protocol: bwgnn                           # etbench protocol (required)
        model: "ET (paper)"                       # row label shown in the table (required)
        metric: best/test/macro_f1                # etbench metric name (required)
        value: 0.0                                # the published number, in etbench's units (required)
        std: 0.0                                  # published spread, if any (optional)
        match: {params.data.train_ratio: "0.4"}   # run columns that must hold these values (optional)

A reference is shown in a table when its dataset and protocol are the table's and every ``match`` entry
equals the value (as a string) of every run in the table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

REQUIRED = {"source": str, "dataset": str, "protocol": str, "model": str, "metric": str, "value": (int, float)}
OPTIONAL = {"std": (int, float), "match": dict}
COLUMNS = [*REQUIRED, *OPTIONAL]


def load_references(path: Path | None) -> pd.DataFrame:
    """The reference entries of ``path`` as a DataFrame (empty when ``path`` is None); raise on a bad entry."""
    if path is None:
        return pd.DataFrame(columns=COLUMNS)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference results file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("references", []), list):
        raise ValueError(f"{path}: expected a mapping with a list under 'references'")
    rows = []
    for i, entry in enumerate(doc.get("references") or []):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: references[{i}] must be a mapping, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(COLUMNS))
        if unknown:
            raise ValueError(f"{path}: references[{i}] has unknown field(s) {unknown}; allowed: {COLUMNS}")
        for name, kind in REQUIRED.items():
            if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
                raise ValueError(f"{path}: references[{i}].{name} missing or not {kind}")
        for name, kind in OPTIONAL.items():
            if name in entry and not isinstance(entry[name], kind):
                raise ValueError(f"{path}: references[{i}].{name} must be {kind}")
        rows.append({**{c: None for c in COLUMNS}, **entry})
    return pd.DataFrame(rows, columns=COLUMNS)


def matching(refs: pd.DataFrame, runs: pd.DataFrame, dataset: str, protocol: str, metric: str) -> pd.DataFrame:
    """References for ``metric`` that apply to ``runs`` (all of one dataset and protocol)."""
    out = []
    mask = (refs["dataset"] == dataset) & (refs["protocol"] == protocol) & (refs["metric"] == metric)
    for _, ref in refs[mask].iterrows():
        match = ref["match"] or {}
        ok = all(col in runs.columns and (runs[col].astype(str) == str(val)).all() for col, val in match.items())
        if ok:
            out.append(ref)
    return pd.DataFrame(out, columns=COLUMNS)
