"""Distributed helpers (rank and world size, torchrun's process group), the default device and precision.

Also removing a folder once every rank is done with it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from edgesmith.errors import BadInput

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call created it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32'. 'auto' picks bf16 only on a CUDA device that supports it."""
    if precision == "fp32":
        return "fp32"
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if device.type == "cuda" and not cuda_bf16:
        raise BadInput("precision bf16: this GPU does not support bfloat16; use precision fp32 or auto")
    return "bf16"


def rank_zero_remove(folder: Path) -> None:
    """Remove ``folder`` once every rank is done with it (rank 0 removes it)."""
    import shutil

    rank, world_size = world()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
