"""Processes and devices: one code path for one process and for ``torchrun``, shared by ``train`` and ``eval``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them this
is a single process and nothing is initialised. The backend is NCCL on CUDA, gloo on CPU.

One rule for devices (:func:`process_device`): ``auto`` is CUDA when present, else the CPU; a CUDA device given
without an index is this process's GPU, ``cuda:LOCAL_RANK``; ``cuda:N`` is accepted in a single process and refused
under a multi-process ``torchrun`` (it would put every process on one GPU).

- training (:func:`init_distributed`): a :class:`DistEnv` and the collectives the trainer and the methods use
  (:func:`all_reduce_mean`, :func:`gather_objects`, :func:`any_process`, :func:`barrier`);
- evaluation (:func:`start_eval_processes`): a :class:`Shard`, batch ``b`` evaluated by process ``b % N``; every
  attack is seeded per call, so the merged counts (integers, summed) are exactly a single process's. Only rank 0
  prints: the standard output of the other processes is discarded (their errors, on standard error, stay).
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

#: the autocast dtype of each precision (None: fp32, no autocast), for training and evaluation alike
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``train.precision``: ``auto`` (bf16 on a CUDA device that supports it, else fp32) or one of AUTOCAST_DTYPES
TRAIN_PRECISIONS = ("auto", *AUTOCAST_DTYPES)
#: ``mmtard eval --precision``: fp32, or bf16 autocast checked against fp32 (fp16 is not offered)
EVAL_PRECISIONS = ("fp32", "bf16")
#: the precisions the benchmarks time (``benchmarks/aa_throughput.py``, ``benchmarks/gpu_step_time.py``) and their
#: autocast dtypes: bf16 and fp32 (fp16 is not timed: a training step would need a grad scaler)
BENCHMARK_PRECISIONS = {name: AUTOCAST_DTYPES[name] for name in ("bf16", "fp32")}


@dataclass(frozen=True)
class DistEnv:
    """This training process: its rank, the number of processes, its local rank and its device."""

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


def torchrun_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def check_device(requested: str | None, field: str = "device") -> torch.device:
    """The device to use: ``auto``/None is CUDA when present, else CPU; a CUDA device must exist here.

    Raises:
        ConfigError: an unreadable device name, or CUDA (or a GPU index) or MPS this machine does not have.
    """
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(requested, field)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {requested!r} asked for, but this machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{field}: {requested!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():  # only Apple machines have the backend
            raise ConfigError(
                f"{field}: {requested!r} asked for, but this machine has no MPS backend (Apple GPUs only); use cpu"
            )
    elif device.type != "cpu":
        raise ConfigError(f"{field}: device type {device.type!r} is not supported; use auto, cpu or cuda")
    return device


def parse_device(requested: str, field: str = "device") -> torch.device:
    """``torch.device(requested)``, or a :class:`ConfigError` naming ``field``."""
    try:
        return torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{field}: expected auto, cpu, cuda or cuda:N, got {requested!r}") from None


def process_device(requested: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """This process's device, by the one rule of the module docstring.

    Raises:
        ConfigError: ``cuda:N`` for every process of a multi-process run, or a device this machine does not have.
    """
    if requested not in (None, "auto"):
        named = parse_device(requested)
        if named.type == "cuda" and named.index is not None and world_size > 1:
            raise ConfigError(
                f"device: {requested!r} puts all {world_size} processes on one GPU; give cuda (each process takes "
                "the GPU of its LOCAL_RANK) or cpu"
            )
    device = check_device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _join_process_group(device: torch.device, timeout_s: float | None) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)


def init_distributed(requested_device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Read torchrun's environment, pick this process's device (:func:`process_device`) and start the process
    group if needed.

    Args:
        requested_device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        timeout_s: how long a collective waits for the other processes before it fails (torch's default,
            30 minutes, when None). A stalled or dead worker then ends the run instead of hanging it.
    """
    rank, world_size, local_rank = torchrun_ranks()
    device = process_device(requested_device, local_rank, world_size)
    if world_size > 1:
        _join_process_group(device, timeout_s)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistEnv(rank, world_size, local_rank, device)


def start_eval_processes(device: str, timeout_s: float | None = None) -> Shard:
    """Join ``torchrun``'s process group for an evaluation; a single process without ``torchrun``.

    With ``WORLD_SIZE > 1``: the device follows :func:`process_device` (``cuda`` becomes this process's GPU and is
    set as the current device, so ``"cuda"`` means it from here on); the group uses NCCL on CUDA, gloo on the CPU
    and is destroyed at exit; the standard output of processes other than rank 0 is discarded. Calling it again
    in the same process changes nothing.

    Args:
        device: the validated device name (``cpu``, ``cuda``, ``cuda:N``).
        timeout_s: how long a collective waits for the other processes (torch's default when None).

    Raises:
        ConfigError: ``cuda:N`` names one GPU for every process of a multi-process run.
    """
    rank, world_size, local_rank = torchrun_ranks()
    if world_size <= 1:
        return Shard()
    initialised = dist.is_initialized()
    _join_process_group(process_device(device, local_rank, world_size), timeout_s)
    if not initialised:
        atexit.register(cleanup)
    if rank != 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the rest of the process)
    return Shard(rank, world_size)


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


def gather(value: object, shard: Shard) -> list:
    """``value`` of every process of ``shard``'s evaluation in rank order (``[value]`` in one process); a
    collective."""
    if not shard.distributed:
        return [value]
    return gather_objects(value)


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
