"""Inner maximisation objectives (spec 2.2): what PGD maximises to make ``x'`` in a training step.

Each objective is one registered function ``(context) -> per-sample loss of the perturbed images``, or ``None``
for no attack. A new objective is one function here with ``@INNER_OBJECTIVES.register(name)`` and its test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from mmtard.methods.losses import cross_entropy_objective, per_sample_kl, squared_distance
from mmtard.methods.teachers import ORIGINAL, STANDARD_INNER_TEACHERS
from mmtard.registry import Registry

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class InnerContext:
    """What an inner objective may use.

    Attributes:
        model: the unwrapped student ``ZeroShotClassifier`` (pixels in ``[0, 1]`` to logits).
        y: ``(B,)`` labels.
        temperature: ``tau`` of the distributions.
        teacher_logits: teacher name -> that teacher's logits on the clean images (computed once per step).
        teacher_features: name -> that model's unnormalised image features on the clean images.
        inner_teachers: teacher kind (``clean``, ``robust``) -> the name of the teacher a ``kl-*`` objective
            uses; by default the standard teachers, named after their kinds.
    """

    model: nn.Module
    y: torch.Tensor
    temperature: float
    teacher_logits: Callable[[str], torch.Tensor]
    teacher_features: Callable[[str], torch.Tensor]
    inner_teachers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(STANDARD_INNER_TEACHERS))


InnerObjective = Callable[[InnerContext], LossFn | None]
INNER_OBJECTIVES: Registry[InnerObjective] = Registry("inner")


@INNER_OBJECTIVES.register("kl-clean-teacher")
def kl_to_clean_teacher(ctx: InnerContext) -> LossFn:
    """``KL(P_C(x) || P_S(x + delta))`` (MMT-ARD, the released script); ``C`` the context's clean teacher."""
    target = ctx.teacher_logits(ctx.inner_teachers["clean"])
    return lambda x_adv: per_sample_kl(target, ctx.model(x_adv), ctx.temperature)


@INNER_OBJECTIVES.register("kl-robust-teacher")
def kl_to_robust_teacher(ctx: InnerContext) -> LossFn:
    """``KL(P_R(x) || P_S(x + delta))`` (ARD, RSLAD); ``R`` the context's robust teacher."""
    target = ctx.teacher_logits(ctx.inner_teachers["robust"])
    return lambda x_adv: per_sample_kl(target, ctx.model(x_adv), ctx.temperature)


@INNER_OBJECTIVES.register("ce")
def cross_entropy(ctx: InnerContext) -> LossFn:
    """``CE(z_S(x + delta), y)`` (TeCoA, PMG-AFT)."""
    return cross_entropy_objective(ctx.model, ctx.y)


@INNER_OBJECTIVES.register("fare")
def embedding_distance(ctx: InnerContext) -> LossFn:
    """``||f_S(x + delta) - f_O(x)||_2^2`` with ``O`` the frozen original model (FARE)."""
    target = ctx.teacher_features(ORIGINAL)
    return lambda x_adv: squared_distance(ctx.model(x_adv, return_features=True), target)


@INNER_OBJECTIVES.register("none")
def no_attack(ctx: InnerContext) -> None:
    """No attack: ``x' = x`` (clean fine-tuning)."""
    return None
