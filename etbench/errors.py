"""The one base class of errors a user can cause and fix (bad config, grid, data, storage, cluster settings).

The CLI prints these as one ``error: …`` line and exits 2 (the traceback only with ``--debug``); anything else is a
bug and keeps its traceback. Each subclass also derives from the built-in type it has always been (``ValueError``,
``RuntimeError``), so existing ``except`` clauses keep working. A leaf module: it imports nothing from etbench.
"""

from __future__ import annotations


class EtbenchError(Exception):
    """Something the user asked for cannot work as given; the message names the file, key or setting and the fix."""


# OS errors a user causes by naming a path or address that is not there (not every OSError: a full disk is not)
USER_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                   PermissionError, ConnectionError)


def _is_mlflow_error(exc: BaseException) -> bool:
    """MLflow's own exception (bad tracking URI, unreachable server, missing experiment), without importing mlflow."""
    return any(c.__name__ == "MlflowException" and c.__module__.startswith("mlflow") for c in type(exc).__mro__)


def user_error(exc: BaseException, depth: int = 8) -> BaseException | None:
    """The user-caused error ``exc`` is or was explicitly raised from (``raise … from``, a Ray task or Ray Train
    worker failure), or None when ``exc`` is a bug. Implicit ``__context__`` is not followed: a bug raised while
    handling a user error is still a bug."""
    if isinstance(exc, (EtbenchError, *USER_OS_ERRORS)) or _is_mlflow_error(exc):
        return exc
    if depth == 0:
        return None
    workers = getattr(exc, "worker_failures", None)
    inner = [exc.__cause__, getattr(exc, "cause", None), *(workers.values() if isinstance(workers, dict) else ())]
    for e in inner:
        if isinstance(e, BaseException) and e is not exc:
            found = user_error(e, depth - 1)
            if found is not None:
                return found
    return None
