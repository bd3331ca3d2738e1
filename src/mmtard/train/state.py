"""The training state: what one step reads and updates (:class:`TrainState`, saved whole in each checkpoint) and
everything ``train`` builds before its loop (:class:`Run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtard.data import ImageDataset, TrainAugment
from mmtard.methods import Method
from mmtard.models import CLIPBundle, ZeroShotClassifier


@dataclass
class TrainState:
    """What one step reads and updates; saved whole in each checkpoint."""

    step: int
    student: nn.Module  # the student ZeroShotClassifier, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    method: Method
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (train.on_nonfinite: skip)


@dataclass
class Run:
    """Everything ``train`` builds before its loop (and before it writes anything)."""

    state: TrainState
    student_bundle: CLIPBundle
    teachers: dict[str, ZeroShotClassifier]
    student: ZeroShotClassifier  # the student's classifier, unwrapped (``state.student`` may be its DDP wrapper)
    params: list[nn.Parameter]
    autocast_dtype: torch.dtype | None
    train_set: ImageDataset
    eval_set: ImageDataset
    augment: TrainAugment | None = None  # data.augment: applied to every training batch
