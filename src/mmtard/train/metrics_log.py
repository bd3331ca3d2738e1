"""Logging of a run: ``metrics.jsonl``, ``eval.jsonl`` and TensorBoard on rank 0, and the logged numbers of a step."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from mmtard.distributed import DistEnv, all_reduce_mean
from mmtard.fileio import atomic_write_text
from mmtard.train.rundir import RunDir, read_jsonl

logger = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl`` (one object per logged step), ``eval.jsonl`` and TensorBoard, on rank 0 only.

    TensorBoard is optional (``pip install mmtard[tensorboard]``): without it the run logs a warning once
    and writes the JSON logs alone, which hold every number TensorBoard would show.
    """

    def __init__(self, run: RunDir, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.metrics_path = run.metrics
        self.eval_path = run.eval_log
        self.writer = None
        if not enabled:
            return
        for path in (self.metrics_path, self.eval_path):  # drop lines logged after the checkpoint resumed from
            if path.exists():
                kept = [record for record in read_jsonl(path) if record["step"] <= resume_step]
                atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
        self.writer = tensorboard_writer(run, resume_step)

    def _append(self, path: Path, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, record)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def log_eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        self._append(self.eval_path, {"step": step, **result})
        if self.writer is None:
            return
        self.writer.add_scalar("eval/clean_acc", result["clean_acc"], step)
        for entry in result["robust"]:
            self.writer.add_scalar(f"eval/{entry['attack']}_{entry['eps']}", entry["acc"], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(run: RunDir, resume_step: int):
    """A TensorBoard ``SummaryWriter`` on ``run.tensorboard``, or None (with a warning) without tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        logger.warning(
            "tensorboard is not installed: no TensorBoard events (metrics.jsonl and eval.jsonl hold every number); "
            "pip install 'mmtard[tensorboard]' to have them"
        )
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1 if resume_step else None)


def logged_values(loss: torch.Tensor, metrics: dict, env: DistEnv) -> dict:
    """The step's loss and metrics as Python numbers over the global batch, read from the device here, at
    log time only, in one transfer (the steps in between never wait for the device to report a number).

    ``loss`` is the mean over processes of each one's loss (in float32, as computed). A metric is the mean
    over processes of each one's value, in float64 (the batch accuracies are per shard; terms the method
    already averaged across processes are unchanged); in one process a metric that is already a Python
    number is kept as it is. Metrics may be tensors (one element) or Python numbers.

    Returns:
        ``{"loss": float, **metrics}``.
    """
    names = [
        name
        for name, value in metrics.items()
        if isinstance(value, torch.Tensor) or (env.distributed and isinstance(value, (int, float)))
    ]
    values = [all_reduce_mean(loss.detach().float()).double().reshape(1)]
    if names:
        values.append(all_reduce_mean(torch.stack([as_float64(metrics[name], loss.device) for name in names])))
    loss_value, *means = torch.cat(values).tolist()  # the one host sync of a logged step
    return {"loss": loss_value, **metrics, **dict(zip(names, means))}


def as_float64(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A one-element tensor or a Python number as a float64 scalar on ``device`` (no host sync)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)
