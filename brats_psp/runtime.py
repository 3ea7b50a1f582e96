"""Where and how the network runs: device, precision, threads, seeds, and the process group.

``precision: auto`` picks mixed precision on CUDA (bf16 where the card supports it, else
fp16 with a gradient scaler) and, on CPU, bf16 autocast only where the processor has native
bf16 instructions (AVX512-BF16 or AMX); elsewhere fp32, which is faster there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from brats_psp.cpus import launch_rank

__all__ = ["Runtime", "cpu_has_bf16", "setup_runtime", "seed_everything", "rng_state", "set_rng_state", "autocast", "shutdown"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the processor has native bf16 matrix instructions."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Runtime:
    """The resolved execution settings of one process."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        return f"{name}, {self.precision}, {self.world_size} process(es)"


def _resolve_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int = 0) -> Runtime:
    """Pick the device and precision; join the process group when started by ``torchrun``."""
    rank, world_size = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    if threads:
        torch.set_num_threads(threads)
    elif world_size > 1 and dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, _resolve_dtype(dev, precision), rank, world_size, local_rank)


def shutdown(runtime: Runtime, finished: bool = False) -> None:
    """Leave the process group (if this process joined one).

    ``finished``: every process got to the end, so they first wait for each other. Without the
    barrier a rank that is done early (rank 1, while rank 0 still writes the checkpoint and logs
    the model) tears its gloo pairs down and exits under a peer that still holds them; in the CI run of
    6a4e343 (not reproduced in 14 local runs) that rank died in C++ teardown ("terminate called
    without an active exception", SIGABRT). After a failure there is no barrier: a peer may be gone.
    """
    if runtime.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def autocast(runtime: Runtime) -> Iterator[None]:
    """Autocast to the runtime's dtype, or nothing for fp32."""
    if runtime.dtype is None:
        yield
    else:
        with torch.autocast(runtime.device.type, dtype=runtime.dtype):
            yield


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """The random states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "gauss": [int(np_state[3]), float(np_state[4])]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], *np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
