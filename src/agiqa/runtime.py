"""Where and how things run: device and dtype resolution, and the ``torchrun`` helpers.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) the data-parallel helpers are
no-ops, so the same code runs in one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from agiqa.errors import ConfigError
from agiqa.options import spell

__all__ = ["DTYPES", "all_reduce_sum", "barrier", "is_main", "process_group", "rank",
           "resolve_device", "resolve_dtype", "world_size"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is this process's GPU (``LOCAL_RANK`` under ``torchrun``) when there is one."""
    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{spell('device', device)} asked for, but no CUDA device is "
                          "available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None


def resolve_dtype(dtype: str, device: torch.device, gpu_default: str = "bfloat16") -> str:
    """``auto`` is ``gpu_default`` on a GPU and float32 on a CPU."""
    if dtype == "auto":
        return gpu_default if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return dtype


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


@contextmanager
def tf32(enabled: bool):
    """With ``enabled``, TF32 for CUDA matrix products and convolutions in the block (a 10-bit
    mantissa for the products, float32 accumulation); otherwise PyTorch's defaults, the
    official code's: float32 matrix products, cuDNN free to use TF32 for convolutions."""
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
