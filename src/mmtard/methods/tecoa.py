"""TeCoA: text-guided contrastive adversarial training (Mao et al., "Understanding Zero-Shot Adversarial
Robustness for Large-Scale Models", ICLR 2023).

``x'`` from PGD maximising ``CE(z_S(x + delta), y)``; loss ``CE(z_S(x'), y)`` (batch mean). No teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.methods.base import CleanImageOutputs, Method, MethodOutput, accuracy, unwrap
from mmtard.methods.registry import register_method


@register_method("tecoa", inner="ce", diw="none", balance="fixed")
class TeCoA(Method):
    """Adversarial fine-tuning on the zero-shot cross-entropy. Metrics: ``ce``, ``acc_adv``."""

    inner_objectives = ("ce",)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        x_adv = self.adversarial(unwrap(student), CleanImageOutputs(self.teachers, x), y)
        logits = student(x_adv)
        ce = F.cross_entropy(logits, y)
        return MethodOutput(
            losses={"ce": ce}, metrics={"ce": ce.item(), "acc_adv": accuracy(logits, y)}, x_adv=x_adv.detach()
        )
