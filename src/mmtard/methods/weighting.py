"""Dynamic importance weighting (DIW, spec 2.6): per-sample weights of one teacher's term, without gradient.

Each mode is one registered function ``(logits, y, settings) -> (weights, signal)``:

- ``weights``: ``(B,)`` per-sample weights ``a_{k,i}``, so that ``L_k = mean_i a_{k,i} * l_{k,i}``;
- ``signal``: ``(B,)`` the raw per-sample quantity to log (true-class probability for ``confidence``, true-class
  cosine for every other mode): normalised weights average 1 by construction and say nothing.

A new mode is one function here with ``@DIW_MODES.register(name)`` and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmtard.methods.losses import normalize_by_batch_mean, true_class_cosine, true_class_probability
from mmtard.registry import Registry


@dataclass(frozen=True)
class WeightingSettings:
    """What a DIW mode may need besides the logits.

    Attributes:
        logit_scale: the teacher's logit scale ``s``, to read cosines from its logits ``z = s * e @ T^T``.
        temperature: ``tau_w`` of the ``confidence`` mode.
        reference_scale: constant of the ``reference`` mode (50 robust, 5 clean in the released script).
        batch_mean: the batch mean used for normalisation (the global batch's under DDP).
    """

    logit_scale: float
    temperature: float = 1.0
    reference_scale: float = 1.0
    batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean


DiwMode = Callable[[torch.Tensor, torch.Tensor, WeightingSettings], tuple[torch.Tensor, torch.Tensor]]
DIW_MODES: Registry[DiwMode] = Registry("diw")
# The modes whose weights are not divided by their batch mean (spec 2.6): every other mode's are non-negative and
# average 1 over the batch.
UNNORMALISED_MODES = frozenset({"reference"})


@DIW_MODES.register("cosine")
def cosine_weights(logits: torch.Tensor, y: torch.Tensor, settings: WeightingSettings):
    """``max(cos(e_k(input_i), t_{k,y_i}), 0)`` divided by its batch mean (all ones when that mean is 0)."""
    cosine = true_class_cosine(logits, y, settings.logit_scale)
    return normalize_by_batch_mean(cosine.clamp_min(0), settings.batch_mean), cosine


@DIW_MODES.register("confidence")
def confidence_weights(logits: torch.Tensor, y: torch.Tensor, settings: WeightingSettings):
    """The teacher's true-class probability ``softmax(z / tau_w)[y]`` divided by its batch mean."""
    probability = true_class_probability(logits, y, settings.temperature)
    return normalize_by_batch_mean(probability, settings.batch_mean), probability


@DIW_MODES.register("reference")
def reference_weights(logits: torch.Tensor, y: torch.Tensor, settings: WeightingSettings):
    """The released script's ``reference_scale * cos(e_k(input_i), t_{k,y_i})``, neither normalised nor clamped."""
    cosine = true_class_cosine(logits, y, settings.logit_scale)
    return settings.reference_scale * cosine, cosine


@DIW_MODES.register("none")
def uniform_weights(logits: torch.Tensor, y: torch.Tensor, settings: WeightingSettings):
    """All weights 1 (the true-class cosine is still logged)."""
    cosine = true_class_cosine(logits, y, settings.logit_scale)
    return torch.ones_like(cosine), cosine


@torch.no_grad()
def importance_weights(
    mode: str, logits: torch.Tensor, y: torch.Tensor, settings: WeightingSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample DIW weights of one teacher (spec 2.6), without gradient.

    Args:
        mode: a name from ``DIW_MODES``.
        logits: ``(B, K)`` the teacher's logits on the input it saw.
        y: ``(B,)`` true labels in the teacher's label set.
        settings: scale, temperature, constant and batch mean.

    Returns:
        ``(weights, signal)``, each ``(B,)``.
    """
    return DIW_MODES.get(mode)(logits, y, settings)
