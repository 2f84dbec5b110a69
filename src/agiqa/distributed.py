"""Data-parallel helpers for ``torchrun``: rank, world size, process group, collectives.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op, so the
same code runs in one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "barrier", "is_main", "process_group", "rank", "world_size"]


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


@contextmanager
def process_group(device: torch.device):
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) for the ``with`` body.

    A group that is already initialised (by the caller) is used and left alone.
    """
    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        owned = True
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (identity in one process)."""
    if world_size() == 1 or not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
