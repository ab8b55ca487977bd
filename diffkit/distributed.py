"""Thin helpers around ``torch.distributed`` for runs launched with ``torchrun``.

Every helper also works in a plain single process (no process group): rank 0 of a world of
size 1, and collective calls become no-ops, so callers never need two code paths.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "device_for_rank",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
]


def launched_distributed() -> bool:
    """True when this process was started by torchrun (or similar) as part of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Index of this worker on its own machine (selects the GPU); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Only the main process (rank 0) logs, saves checkpoints and draws samples."""
    return get_rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """Give each worker its own GPU: a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    if device.type == "cuda" and device.index is None and launched_distributed():
        return torch.device("cuda", get_local_rank())
    return device


def init_distributed(device: torch.device) -> bool:
    """Join the process group described by torchrun's environment variables.

    Uses NCCL for CUDA devices and gloo otherwise (CPU). Returns True when this call created
    the group (so the caller knows to tear it down), False when there is nothing to do: a
    single process, or a group someone else already set up.
    """
    if not launched_distributed() or is_distributed():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def cleanup() -> None:
    """Destroy the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every worker; a no-op in a single process."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the GPU from the rank and warns about it.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all workers (in place) and return it; unchanged in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor
