"""``mmtard eval`` under ``torchrun``: the batches are shared out across processes and their counts merged.

``torchrun --nproc_per_node N -m mmtard.cli eval ...`` starts N processes that each load the model and read
the same dataset. Batch ``b`` (the same ``batch_size`` images a single process would put in it) is evaluated
by process ``b % N``; every attack is seeded per call, so a batch's counts do not depend on the process
that evaluates it, and the merged counts (integers, summed) are exactly a single process's. Only rank 0
writes the results and prints; each process journals its own batches (``OUT/journal``, one file per
process), so an interrupted run restarted with the same command continues.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) nothing here starts anything, and an
evaluation is the single process's.
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mmtard.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: batch ``b`` is its own when ``b % world_size == rank``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, batch: int) -> bool:
        return batch % self.world_size == self.rank

    def batches(self, count: int) -> range:
        """This process's batch indices among ``count`` batches."""
        return range(self.rank, count, self.world_size)

    @classmethod
    def from_process_group(cls) -> Shard:
        """The shard of this process in the initialised process group (the whole evaluation without one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def gather(value: object, shard: Shard) -> list:
    """``value`` of every process in rank order (``[value]`` in one process); a collective."""
    if not shard.distributed:
        return [value]
    gathered: list = [None] * shard.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def start_eval_processes(device: str, timeout_s: float | None = None) -> Shard:
    """Join ``torchrun``'s process group for an evaluation; a single process without ``torchrun``.

    With ``WORLD_SIZE > 1``: a CUDA ``device`` given without an index becomes this process's GPU
    (``cuda:LOCAL_RANK``, set as the current device, so ``"cuda"`` means it from here on) and the group uses
    NCCL; on the CPU, gloo. The group is destroyed at exit. The standard output of processes other than
    rank 0 is discarded (their errors, on standard error, stay), so the table is printed once. Calling it
    again in the same process changes nothing.

    Args:
        device: the validated device name (``cpu``, ``cuda``, ``cuda:N``).
        timeout_s: how long a collective waits for the other processes (torch's default when None).

    Returns:
        This process's :class:`Shard`.

    Raises:
        ConfigError: ``cuda:N`` names one GPU for every process of a multi-process run.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Shard()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if chosen.index is not None:
            raise ConfigError(
                f"device: {device!r} puts all {world_size} processes on one GPU; give cuda (each process takes "
                "the GPU of its LOCAL_RANK) or cpu"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo", timeout=timeout)
        atexit.register(_destroy_process_group)
    if rank != 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the rest of the process)
    return Shard(rank, world_size)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
