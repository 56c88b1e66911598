"""Keep the console for etbench's own progress and results; the libraries' chatter goes to a log file that stays.

Ray Tune prints a "Configuration for experiment" box, a results path and a TensorBoard hint even at ``verbose=0``
(``print`` calls in its reporter module, ``ray.tune.experimental.output``); Ray and Tune log INFO lines; a new MLflow
store logs its database migration. None of it is thrown away: once a sweep (or a tracked run) calls
:func:`route_library_logs`, those loggers' INFO records (their console handlers keep WARNING and above) and the
reporter's prints are appended to ``<grid folder>/logs/library.log``, whose path the caller prints once. Only
Tune's reporter is redirected (its module-level ``print``), so etbench's own progress callbacks still print.
"""

from __future__ import annotations

import builtins
import logging
import sys
import time
from pathlib import Path
from typing import Any

LIBRARY_LOGGERS = ("mlflow", "alembic", "ray")
LOG_NAME = "library.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _State:
    path: Path | None = None
    handler: logging.Handler | None = None
    started: bool = False  # the file (and its folder) exist only once something is written: a refused sweep
    # leaves no trace


def _start() -> Path:
    """Create the log's folder and write this invocation's header, the first time anything is logged."""
    assert _State.path is not None
    if not _State.started:
        _State.path.parent.mkdir(parents=True, exist_ok=True)
        with _State.path.open("a", encoding="utf-8") as f:
            f.write(f"\n===== etbench {' '.join(sys.argv[1:]) or '(library call)'} at {time.strftime('%F %T')} "
                    f"=====\n")
        _State.started = True
    return _State.path


class _LazyFileHandler(logging.FileHandler):
    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):  # type: ignore[no-untyped-def]
        _start()
        return super()._open()


def route_library_logs(folder: Path) -> Path:
    """From now on (this process), MLflow/Ray/Tune INFO records go to ``folder/logs/library.log`` (appended, created
    on the first record), not the console; warnings and errors still reach the console too. Calling it again moves
    the file (next grid). Returns the file's absolute path."""
    import mlflow  # noqa: F401  (both configure their loggers when imported: do that before adjusting them)
    import ray  # noqa: F401
    from ray.tune.experimental import output as tune_output

    path = (Path(folder) / "logs" / LOG_NAME).resolve()
    if _State.path == path:
        return path
    handler = _LazyFileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        for h in lg.handlers:
            if h is _State.handler:
                continue
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
        if _State.handler is not None:
            lg.removeHandler(_State.handler)
        lg.addHandler(handler)
        if name == "alembic":
            lg.propagate = False  # alembic has no handler of its own; root's (if any) would print it again
    if _State.handler is not None:
        _State.handler.close()
    _State.path, _State.handler, _State.started = path, handler, False
    tune_output.print = _tune_print  # type: ignore[attr-defined]  # shadows the builtin in that module only
    return path


def _tune_print(*args: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
                flush: bool = False) -> None:
    """Tune's reporter's ``print``: into the current library log (to the console when none is set)."""
    if _State.path is None:
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
        return
    with _start().open("a", encoding="utf-8") as f:
        builtins.print(*args, sep=sep, end=end, file=f)
