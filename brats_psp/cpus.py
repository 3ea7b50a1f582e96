"""How many CPU cores this process may use, how many worker processes to start, and which of
torchrun's processes this one is.

Torch-free, so that stages which do not need torch (``demo-data``) do not import it.
"""

from __future__ import annotations

import os

__all__ = ["available_cores", "default_workers", "launch_rank"]


def available_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers(limit: int = 8) -> int:
    """Worker processes for a CPU-bound stage over many cases: one per available core, at most ``limit``."""
    return max(1, min(available_cores(), limit))


def launch_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process as torchrun's environment says; ``(0, 1)`` without it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
