"""One code path for one process and for ``torchrun`` (many GPUs, many machines).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without
them this is a single process and nothing is initialised. The backend is NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """This process's device: ``auto`` is ``cuda:<local_rank>`` when CUDA is present, else the CPU.

    Raises:
        ConfigError: a device this machine does not have (see :func:`mmtard.train.preflight.check_device`).
    """
    from mmtard.train.preflight import check_device

    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = check_device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(requested_device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Read torchrun's environment, pick this process's device and start the process group if needed.

    Args:
        requested_device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        timeout_s: how long a collective waits for the other processes before it fails (torch's default,
            30 minutes, when None). A stalled or dead worker then ends the run instead of hanging it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity in a single process). Used for statistics that must agree across
    ranks: the batch mean of DIW weights and the teacher terms that drive the balance."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def gather_objects(value: object) -> list:
    """``value`` of every process, in rank order (``[value]`` in a single process). A collective: every
    process must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def any_process(flag: bool | int) -> int:
    """The largest of every process's ``flag`` (``int(flag)`` in a single process): lets all processes
    agree on a decision one of them made (a signal received, a check failed). A collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(flag)
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
