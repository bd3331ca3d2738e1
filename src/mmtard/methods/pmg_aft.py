"""PMG-AFT: pre-trained-model-guided adversarial fine-tuning (Wang et al., "Pre-trained Model Guided
Fine-Tuning for Zero-Shot Adversarial Robustness", CVPR 2024).

``x'`` from PGD maximising ``CE(z_S(x + delta), y)``; loss
``CE(z_S(x'), y) + mean_i KL(P_O(x'_i) || P_S(x'_i)) + mean_i KL(P_S(x_i) || P_S(x'_i))`` with ``O`` the
frozen original model. In the last term the gradient flows through both ``P_S(x)`` and ``P_S(x')``: the
clean distribution is a training output, not a fixed target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.methods.base import (
    CleanImageOutputs,
    Method,
    MethodOutput,
    accuracy,
    student_forward_pair,
    teacher_forward,
    unwrap,
)
from mmtard.methods.losses import per_sample_kl
from mmtard.methods.registry import register_method
from mmtard.methods.teachers import ORIGINAL


@register_method("pmg-aft", inner="ce", diw="none", balance="fixed")
class PMGAFT(Method):
    """Metrics: ``ce``, ``kl_original``, ``kl_clean_adv``, ``acc_clean``, ``acc_adv``."""

    reads_original = True
    inner_objectives = ("ce",)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        x_adv = self.adversarial(unwrap(student), CleanImageOutputs(self.teachers, x), y)
        original_adv = teacher_forward(self.teachers[ORIGINAL], x_adv)
        student_clean, student_adv = student_forward_pair(student, x, x_adv)
        tau = self.cfg.temperature
        losses = {
            "ce": F.cross_entropy(student_adv, y),
            "kl_original": per_sample_kl(original_adv, student_adv, tau).mean(),
            "kl_clean_adv": per_sample_kl(student_clean, student_adv, tau).mean(),
        }
        metrics = {name: term.item() for name, term in losses.items()}
        metrics["acc_clean"] = accuracy(student_clean, y)
        metrics["acc_adv"] = accuracy(student_adv, y)
        return MethodOutput(losses=losses, metrics=metrics, x_adv=x_adv.detach())
