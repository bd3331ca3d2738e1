"""TeCoA: text-guided contrastive adversarial training (Mao et al., "Understanding Zero-Shot Adversarial
Robustness for Large-Scale Models", ICLR 2023).

``x'`` from PGD maximising ``CE(z_S(x + delta), y)``; loss ``CE(z_S(x'), y)`` (batch mean). No teacher.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.methods.base import Method, MethodOutput, accuracy, unwrap
from mmtard.methods.losses import cross_entropy_objective
from mmtard.methods.registry import register_method
from mmtard.models.zeroshot import ZeroShotClassifier


@register_method("tecoa")
class TeCoA(Method):
    """Adversarial fine-tuning on the zero-shot cross-entropy. Metrics: ``ce``, ``acc_adv``."""

    teacher_roles = ()
    inner_objectives = ("ce",)

    def step(
        self,
        student: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None,
    ) -> MethodOutput:
        model = unwrap(student)
        x_adv = x
        if self.attacking:
            x_adv = self.attack(model, cross_entropy_objective(model, y), x)
        logits = student(x_adv)
        ce = F.cross_entropy(logits, y)
        return MethodOutput(
            losses={"ce": ce}, metrics={"ce": ce.item(), "acc_adv": accuracy(logits, y)}, x_adv=x_adv.detach()
        )
