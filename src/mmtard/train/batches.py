"""The training data stream: each process's share of every global batch, in an order a resume repeats."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mmtard.data import ImageDataset
from mmtard.distributed import DistEnv
from mmtard.errors import ConfigError
from mmtard.train.config import RunConfig

logger = logging.getLogger(__name__)


def batches(dataset: ImageDataset, cfg: RunConfig, env: DistEnv, start_step: int) -> Iterator[tuple[int, tuple]]:
    """Endless ``(epoch, batch)`` stream of this process's share of each global batch, from ``start_step``.

    The order depends only on the seed and the epoch (``DistributedSampler``), so a resumed run sees the
    same batches as an uninterrupted one, and N processes together see the same global batches as one.
    """
    global_batch = cfg.data.batch_size
    check_batch_size(cfg, len(dataset), env.world_size)
    local_batch = global_batch // env.world_size
    per_epoch = len(dataset) // global_batch
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunks = [order[i * local_batch : (i + 1) * local_batch] for i in range(per_epoch)][skip:]
        # Its own generator: creating a DataLoader iterator draws a worker base seed, and a draw from the
        # global RNG would shift the attack's random starts after a resume (a new loader mid-epoch).
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_sampler=chunks,
            num_workers=cfg.data.workers,
            pin_memory=env.device.type == "cuda",
            generator=generator,
        )
        for batch in loader:
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def check_batch_size(cfg: RunConfig, images: int, world_size: int) -> None:
    """The global batch splits evenly over the processes and fits in the training set at least once."""
    global_batch = cfg.data.batch_size
    if global_batch % world_size:
        raise ConfigError(f"data.batch_size: the global batch {global_batch} must divide by the {world_size} processes")
    if global_batch > images:
        raise ConfigError(f"data.batch_size: {global_batch} is larger than the {images} training images")
