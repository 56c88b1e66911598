"""Build DeepSpeed's CPU communication op once (about 50 s on a new machine) so no test times out on it.

Run as ``python -m etbench.engine.warmup``; a no-op when the op is already cached or DeepSpeed is absent.
"""

from __future__ import annotations

import os
import time


def warm_deepspeed() -> float:
    """JIT-build (or load from cache) the shared-memory comm op DeepSpeed's CPU accelerator needs; returns seconds."""
    start = time.perf_counter()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        acc.create_op_builder("ShareMemCommBuilder").load()
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"deepspeed warm-up: {warm_deepspeed():.1f} s")
