"""``../shared/docs/ARCHITECTURE.md``, executable: every import of the ``etbench`` package against its rooms.

Each module is parsed with :mod:`ast` (nothing is imported) and every ``import etbench…`` / ``from etbench… import``
/ relative import is collected: at module level, inside functions and methods, and under ``if TYPE_CHECKING:``.
``from etbench.x import y`` counts as an import of the module ``etbench.x.y`` when that is a module, else of
``etbench.x``.

How the kinds count:

- **Arrows between rooms** (:data:`ALLOWED`): every import counts, function-level and ``TYPE_CHECKING`` ones too.
  A lazy import is still knowledge of the room it names, and a type is too.
- **Circles between modules**: every import that runs counts, function-level ones included (ARCHITECTURE.md:
  an ``etbench`` import hidden inside a function to dodge a circle is itself forbidden). ``TYPE_CHECKING``
  imports never run, and naming a type without a run-time dependency is what they are for, so they do not make a
  circle.
- **Circles between rooms** cannot happen unnoticed: :data:`ALLOWED` itself must be acyclic (tested), so a room
  circle needs an arrow the table does not allow.

A violation that needs a change outside this test's owner's files is listed in :data:`KNOWN_VIOLATIONS` with the
reason and the issue; the test fails when a listed violation no longer exists, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "etbench"

#: Modules every room may import: they import nothing of etbench themselves (checked below).
BASE = {"errors", "hashing", "logs"}

#: Top-level modules that belong to a room (ARCHITECTURE.md's ``etbench/cluster/``: storage, pre-flight,
#: admission and the one way to connect to Ray, today still three top-level modules).
TOP_LEVEL_ROOMS = {"storage": "cluster", "admission": "cluster", "ray_local": "cluster"}

EVERYTHING = "*"

#: Room → the rooms (or ``room.module``) it may import, from ARCHITECTURE.md's "may import" column and its
#: "Never" list. Where the code shows a reason ARCHITECTURE.md does not spell out, the entry says why.
ALLOWED: dict[str, set[str]] = {
    "models": set(),  # torch only: a model knows no files, no cluster, no tracker
    "data": set(),  # a loader never trains
    "tasks": {"data", "models", "config"},
    # engine: the single-run loop, DeepSpeed, Ray Train launch. data: engine/build loads the dataset a task wraps
    # (data sits under tasks; no new direction); cluster: fit checks storage and admits a trial (G3/G4)
    "engine": {"tasks", "models", "tracking", "config", "data", "cluster"},
    # sweep: grid schema, plan, one trial lifecycle, the Tune bridge; models.registry: the cost estimate asks the
    # registry (the one list of models "every other module asks")
    "sweep": {"engine", "tracking", "cluster", "config", "models.registry"},
    # cluster: storage, pre-flight (it loads every dataset a sweep needs on every node: data), admission (reads
    # the resolved run configs: config)
    "cluster": {"tracking", "data", "config"},
    "tracking": set(),  # MLflow helpers; schema.py is the contract with analysis
    "analysis": {"tracking"},  # reads results, not code paths
    "bench": {EVERYTHING},  # whatever it measures
    # testing: fixtures for tests and benchmarks alike (bench/ holds only benchmarks, G8). The generated MLflow store
    # expands a real grid (sweep) and writes what tracking writes; tracking itself imports nothing, so it cannot live
    # there as architecture-2 G8 suggested (tracking/testing.py). cluster: the loopback cluster of the chaos test
    # hands its jobs the runtime env a real submitter does (etbench.storage.job_runtime_env)
    "testing": {"sweep", "tracking", "cluster"},
    "interop": {"models", "data"},  # the authors' checkpoint import (data: the ImageNet normalisation it must match)
    "peers": {"models"},  # the XLA reference step
    "config": {"models"},  # typed configs: model presets and names come from models (the registry)
    "cli": {EVERYTHING},  # everything above; nothing imports cli
    "__main__": {"cli"},
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "etbench.sweep.runner"
    target: str  # imported etbench module
    path: Path
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}"


#: (importing file, imported module) → why it is not fixed here, and the issue that owns the fix.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
    ("etbench/analysis/report.py", "etbench.tasks.graphcls_folds"):
        "arrow analysis → tasks: the report reads N_FOLDS from the task; the constant belongs in "
        "tracking/schema.py (the contract), a change to a file another session owns (issue 26)",
    ("etbench/sweep/tuning.py", "etbench.sweep.grid"):
        "circle sweep.grid ↔ sweep.tuning (tuning imports grid in seven functions): breaking it needs "
        "sweep/grid.py to stop importing tuning (G2: one schema module at the bottom); grid.py is owned by "
        "another session (issue 23 item 1 / architecture-2 G2)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The longest prefix of ``name`` that is an etbench module."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(module: str, path: Path) -> list[Import]:
    """Every etbench import in ``path``, wherever it sits in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typed = _type_checking_nodes(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            if base.split(".")[0] == "etbench":
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _resolve(base)
                           for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [_resolve(a.name) for a in node.names if a.name.split(".")[0] == "etbench"]
        out += [Import(module, t, path, node.lineno, id(node) in typed) for t in targets if t != module]
    return out


ALL_IMPORTS = [imp for m, p in MODULES.items() for imp in imports_of(m, p)]


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "etbench"  # the package's own __init__
    if len(parts) == 2 and MODULES[module].name != "__init__.py":
        return TOP_LEVEL_ROOMS.get(parts[1], parts[1])
    return parts[1]


def allowed(imp: Import) -> bool:
    src, dst = room(imp.source), room(imp.target)
    if dst == "cli":
        return src in ("cli", "__main__")  # nothing imports cli
    if src == dst or dst in BASE or dst == "etbench":
        return True
    rules = ALLOWED.get(src, set())
    return EVERYTHING in rules or dst in rules or imp.target.removeprefix("etbench.") in rules


def _key(imp: Import) -> tuple[str, str]:
    return (str(imp.path.relative_to(PACKAGE.parent)), imp.target)


def forbidden_arrows() -> list[Import]:
    return [imp for imp in ALL_IMPORTS if not allowed(imp)]


def module_circles(drop: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """Strongly connected components (more than one module) of the run-time import graph, without the imports
    whose (file, module) is in ``drop``."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in ALL_IMPORTS:
        if not imp.type_only and imp.target in MODULES and room(imp.target) != "etbench" and _key(imp) not in drop:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return comps


def circle_edges(comp: list[str]) -> list[Import]:
    members = set(comp)
    found = [imp for imp in ALL_IMPORTS if not imp.type_only and imp.source in members and imp.target in members]
    return list({(i.where(), i.target): i for i in found}.values())


# --- the tests ----------------------------------------------------------------------------------------------------
def test_the_walk_sees_every_kind_of_import() -> None:
    """The parser finds function-level, TYPE_CHECKING and relative imports (else the other tests prove nothing)."""
    probe = PACKAGE / "sweep" / "runner.py"
    found = imports_of("etbench.sweep.runner", probe)
    assert any(i.target == "etbench.sweep.trial" for i in found)
    load = imports_of("etbench.analysis.load", PACKAGE / "analysis" / "load.py")
    assert any(i.target == "etbench.tracking.schema" for i in load)
    lazy = [i for i in ALL_IMPORTS if i.source == "etbench.cli.sweep" and i.target == "etbench.sweep.runner"]
    assert lazy, "cli imports the runner inside its handlers: a function-level import the walk must see"
    assert len(ALL_IMPORTS) > 250 and len(MODULES) > 100


def test_every_room_is_in_the_table_and_the_table_has_no_circle() -> None:
    rooms = {room(m) for m in MODULES} - BASE - {"etbench"}
    assert rooms <= set(ALLOWED), f"rooms missing from ALLOWED: {sorted(rooms - set(ALLOWED))}"
    for b in BASE:
        assert not [i for i in ALL_IMPORTS if room(i.source) == b], f"{b} must import nothing of etbench"
    graph = {r: {d.split(".")[0] for d in deps if d != EVERYTHING} for r, deps in ALLOWED.items()}
    seen: dict[str, int] = {}

    def walk(r: str, path: list[str]) -> None:
        if seen.get(r) == 1:
            raise AssertionError(f"ALLOWED has a circle: {' → '.join([*path, r])}")
        if seen.get(r) == 2:
            return
        seen[r] = 1
        for d in sorted(graph.get(r, ())):
            walk(d, [*path, r])
        seen[r] = 2

    for r in sorted(graph):
        walk(r, [])


def test_no_arrow_that_architecture_md_forbids() -> None:
    bad = [i for i in forbidden_arrows() if _key(i) not in KNOWN_VIOLATIONS]
    lines = [f"{i.where()}: {room(i.source)} → {room(i.target)} ({i.source} imports {i.target}"
             f"{', under TYPE_CHECKING' if i.type_only else ''})" for i in bad]
    assert not lines, "imports ARCHITECTURE.md forbids (ALLOWED in tests/test_architecture.py):\n" + "\n".join(lines)


def test_no_import_circle_between_modules() -> None:
    """A circle passes only when removing the listed known imports breaks it."""
    lines = [" ↔ ".join(comp) + ": " + "; ".join(f"{e.where()} imports {e.target}" for e in circle_edges(comp))
             for comp in module_circles(drop=set(KNOWN_VIOLATIONS))]
    assert not lines, "import circles (a function-level import does not break one):\n" + "\n".join(lines)


def test_known_violations_still_exist() -> None:
    """The list only shrinks: a violation fixed elsewhere must be taken off it."""
    arrows = {_key(i) for i in forbidden_arrows()}
    circles = {_key(e) for comp in module_circles() for e in circle_edges(comp)}
    gone = [f"{f} → {t}: {why}" for (f, t), why in KNOWN_VIOLATIONS.items() if (f, t) not in arrows | circles]
    assert not gone, "fixed, so remove from KNOWN_VIOLATIONS:\n" + "\n".join(gone)
