"""FARE: unsupervised adversarial fine-tuning of the image tower (Schlarmann, Singh et al., "Robust CLIP:
Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust Large Vision-Language Models",
ICML 2024).

``f_O(x)``: unnormalised image features of the frozen original model ``O`` on clean ``x``. ``x'`` maximises
``||f_S(x + delta) - f_O(x)||_2^2`` per sample; loss = batch mean of ``||f_S(x') - f_O(x)||_2^2``.
No labels are used, so no accuracy is reported.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtard.methods.base import CleanImageOutputs, Method, MethodOutput, unwrap
from mmtard.methods.losses import squared_distance
from mmtard.methods.registry import register_method
from mmtard.methods.teachers import ORIGINAL


@register_method("fare", inner="fare", diw="none", balance="fixed")
class FARE(Method):
    """Embedding-space adversarial fine-tuning against the frozen original model. Metric: ``fare``."""

    reads_original = True
    inner_objectives = ("fare",)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        clean = CleanImageOutputs(self.teachers, x)
        original_features = clean.features(ORIGINAL)
        x_adv = self.adversarial(unwrap(student), clean, y)
        loss = squared_distance(student(x_adv, return_features=True), original_features).mean()
        return MethodOutput(losses={"fare": loss}, metrics={"fare": loss.item()}, x_adv=x_adv.detach())
