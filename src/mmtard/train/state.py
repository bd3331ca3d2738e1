"""The training state: what one step reads and updates (:class:`TrainState`, saved whole in each checkpoint) and
everything ``train`` builds before its loop (:class:`Setup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtard.data import ImageDataset, TrainAugment
from mmtard.methods import Method, unwrap
from mmtard.models import CLIPBundle, ZeroShotClassifier


@dataclass
class TrainState:
    """What one step reads and updates; saved whole in each checkpoint. The method holds the frozen teachers."""

    step: int
    student: nn.Module  # the student ZeroShotClassifier, wrapped in DDP when distributed (build_run)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    method: Method
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss (train.on_nonfinite: skip)

    @property
    def params(self) -> list[nn.Parameter]:
        """The trained parameters, in the optimizer's order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class Setup:
    """Everything ``train`` builds before its loop (and before it writes anything).

    The student is ``state.student`` (its classifier, DDP-wrapped under torchrun) over the weights of
    ``student_bundle`` (the open_clip model that checkpoints save and held-out evaluations read).
    """

    state: TrainState
    student_bundle: CLIPBundle
    precision: torch.dtype | None  # the autocast dtype (None: fp32)
    train_set: ImageDataset
    eval_set: ImageDataset
    augment: TrainAugment | None = None  # data.augment: applied to every training batch

    @property
    def student(self) -> ZeroShotClassifier:
        """The student's classifier, unwrapped."""
        return unwrap(self.state.student)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.state.params
