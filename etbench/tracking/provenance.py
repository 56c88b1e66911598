"""What a training process observes about itself: the etbench source it imported, the CPU, the host.

``etbench.git_commit`` is stamped by the submitter (a cluster's working-dir copy or image has no .git, and a rebuilt
image under the same tag can hold other code); :func:`code_hash` is computed by the process that trains, over the
files of the ``etbench`` package it actually imported, so code drift between nodes shows in the tags. Standard
library only: tracking imports nothing of etbench, so the package is found from this file's path.
"""

from __future__ import annotations

import hashlib
import platform
import socket
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the imported etbench package (etbench/tracking/provenance.py)
CODE_HASH_CHARS = 16


def source_hash(package_dir: Path) -> str:
    """Short sha256 over every ``.py`` under ``package_dir``, sorted by relative path: path, size, bytes of each
    (the size keeps file boundaries unambiguous)."""
    root = Path(package_dir)
    h = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")):
        data = path.read_bytes()
        h.update(rel.encode())
        h.update(b"\0" + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:CODE_HASH_CHARS]


@lru_cache(maxsize=1)
def code_hash() -> str:
    """:func:`source_hash` of the etbench package this process imported (computed once per process)."""
    return source_hash(PACKAGE_DIR)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hostname() -> str:
    return socket.gethostname()
