"""Loss building blocks of spec section 2: pure tensor functions (per-sample KL, cross-entropy objective,
squared embedding distance, the teachers' true-class signals). DIW modes are in ``weighting.py``, balance rules
in ``balance.py``, inner objectives in ``inner.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmtard.errors import ConfigError


def per_sample_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(P || Q)`` per sample, ``P = softmax(target / tau)``, ``Q = softmax(student / tau)``.

    No ``tau**2`` factor (spec section 1). Gradients flow into both arguments where they require them.

    Args:
        target_logits: ``(B, K)`` logits of the distribution ``P``.
        student_logits: ``(B, K)`` logits of the distribution ``Q``.
        temperature: ``tau``.

    Returns:
        ``(B,)`` per-sample divergences.
    """
    if target_logits.shape != student_logits.shape:
        raise ValueError(
            f"per_sample_kl: logits must have the same shape (same label set), got "
            f"{tuple(target_logits.shape)} and {tuple(student_logits.shape)}"
        )
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def cross_entropy_objective(
    model: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``ce`` inner objective: ``x' -> CE(z(x'), y)`` per sample, for PGD to maximise (TeCoA, PMG-AFT)."""
    return lambda x_adv: F.cross_entropy(model(x_adv), y, reduction="none")


def squared_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||features_i - target_i||_2^2`` per sample (sum over the embedding dimensions), shape ``(B,)``."""
    if features.shape != target.shape:
        raise ConfigError(
            f"teachers['original']: its embeddings {tuple(target.shape)} must match the student's "
            f"{tuple(features.shape)} (FARE compares unnormalised embeddings of the same architecture)"
        )
    return (features.float() - target.float()).pow(2).sum(dim=-1)


def true_class_cosine(logits: torch.Tensor, y: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``cos(e(x_i), t_{y_i})`` read from zero-shot logits ``z = s * e @ T^T``: ``z[i, y_i] / s``."""
    return logits.detach().float().gather(1, y.view(-1, 1)).squeeze(1) / logit_scale


def true_class_probability(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(z / tau_w)[i, y_i]``, shape ``(B,)``."""
    return F.softmax(logits.detach().float() / temperature, dim=-1).gather(1, y.view(-1, 1)).squeeze(1)


def normalize_by_batch_mean(
    signal: torch.Tensor, batch_mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean
) -> torch.Tensor:
    """``signal / mean(signal)`` so the weights average 1; all ones when the batch mean is 0.

    ``batch_mean`` computes the mean; under DistributedDataParallel the trainer passes the mean over the
    whole global batch, so every process divides by the same number as a single process would.
    """
    mean = batch_mean(signal)
    # torch.where instead of a python branch: no device synchronisation (the unused branch may be nan).
    return torch.where(mean == 0, torch.ones_like(signal), signal / mean)


def batch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of ``logits`` on the batch as a 0-d tensor in ``[0, 1]`` (no device synchronisation)."""
    return (logits.detach().argmax(dim=-1) == y).float().mean()


def accuracy_shortfall(teacher_accuracy: torch.Tensor, student_accuracy: torch.Tensor) -> torch.Tensor:
    """How far the student's accuracy falls behind a teacher's, relative to the teacher's (spec 2.7, ``gap``).

    ``s = max(acc_teacher - acc_student, 0) / acc_teacher``, and 0 when ``acc_teacher == 0``.
    """
    gap = (teacher_accuracy - student_accuracy).clamp_min(0)
    return torch.where(teacher_accuracy > 0, gap / teacher_accuracy.clamp_min(1e-12), torch.zeros_like(gap))
