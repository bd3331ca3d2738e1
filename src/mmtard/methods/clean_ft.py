"""Clean fine-tuning: ``CE(z_S(x), y)``, no attack. It makes the clean teacher of MMT-ARD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.methods.base import Method, MethodOutput, accuracy
from mmtard.methods.registry import register_method


@register_method("clean-ft", inner="none", diw="none", balance="fixed", steps=0)
class CleanFineTuning(Method):
    """Zero-shot cross-entropy on clean images. Metrics: ``ce``, ``acc_clean``."""

    inner_objectives = ("none",)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        logits = student(x)
        ce = F.cross_entropy(logits, y)
        return MethodOutput(losses={"ce": ce}, metrics={"ce": ce.item(), "acc_clean": accuracy(logits, y)}, x_adv=x)
