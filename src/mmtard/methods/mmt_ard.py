"""MMT-ARD: multimodal multi-teacher adversarial distillation (Li, Dong, Yang et al., arXiv 2511.17448),
and its single-teacher special case ARD with the robust teacher alone.

One step (spec section 2): clean-teacher logits on ``x``; ``x'`` by PGD on the inner objective; robust-
teacher logits on ``x'``; student logits on ``x`` and ``x'``; per-sample terms
``l_R,i = KL(P_R(x'_i) || P_S(x'_i))`` and ``l_C,i = KL(P_C(x_i) || P_S(x_i))``; DIW weights ``a_k,i``;
``L_k = mean_i a_k,i l_k,i``; loss ``sum_k lambda_k L_k`` with the balance's ``lambda_k``.

Teachers pass knowledge through their class-text distributions only, so teacher and student embedding
sizes may differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmtard.methods.base import (
    LogitCache,
    LossFn,
    Method,
    MethodOutput,
    accuracy,
    student_forward_pair,
    teacher_forward,
    unwrap,
)
from mmtard.methods.config import MethodConfig
from mmtard.methods.losses import create_balance, cross_entropy_objective, importance_weights, per_sample_kl
from mmtard.methods.registry import register_method
from mmtard.models.zeroshot import ZeroShotClassifier

# Metric suffix of each teacher role: L_R, lambda_R, robust_teacher_score; L_C, lambda_C, clean_teacher_score.
ROLE_SUFFIX = {"robust": "R", "clean": "C"}


@register_method("mmt-ard")
@register_method("reference")
class MMTARD(Method):
    """Multi-teacher adversarial distillation with DIW and an adaptive balance (presets ``mmt-ard``, ``reference``).

    The ``reference`` preset is this class with ``diw: reference`` and the ``fixed`` 1/1 balance, as in
    the released training script.
    """

    teacher_roles = ("clean", "robust")
    inner_objectives = ("kl-clean-teacher", "kl-robust-teacher", "ce")

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.balance = create_balance(
            cfg.balance,
            self.teacher_roles,
            beta=cfg.beta,
            momentum=cfg.ema_momentum,
            eta=cfg.eta,
            fixed={"robust": cfg.lambda_robust, "clean": cfg.lambda_clean},
        )
        self.reference_scale = {"robust": cfg.reference_robust_scale, "clean": cfg.reference_clean_scale}
        self.clean_cache = LogitCache()

    def step(
        self,
        student: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None,
    ) -> MethodOutput:
        model = unwrap(student)
        has_clean = "clean" in self.teacher_roles
        clean_teacher_logits = self._clean_teacher_logits(teachers["clean"], x, index) if has_clean else None
        x_adv = x
        if self.attacking:
            x_adv = self.attack(model, self._inner_loss(model, teachers, clean_teacher_logits, x, y), x)
        if has_clean:
            student_clean, student_adv = student_forward_pair(student, x, x_adv)
        else:
            student_clean, student_adv = None, student(x_adv)

        # What each teacher saw and the student's logits on the same images.
        pairs = {"robust": (teacher_forward(teachers["robust"], x_adv), student_adv)}
        if has_clean:
            pairs["clean"] = (clean_teacher_logits, student_clean)

        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for role in self.teacher_roles:
            teacher_logits, student_logits = pairs[role]
            per_sample = per_sample_kl(teacher_logits, student_logits, self.cfg.temperature)
            weights, signal = importance_weights(
                self.cfg.diw,
                teacher_logits,
                y,
                logit_scale=unwrap(teachers[role]).logit_scale,
                temperature=self.cfg.diw_temperature,
                reference_scale=self.reference_scale[role],
                batch_mean=lambda s: self.mean_across_processes(s.mean()),
            )
            terms[role] = (weights * per_sample).mean()
            metrics[f"L_{ROLE_SUFFIX[role]}"] = self.mean_across_processes(terms[role].detach()).item()
            metrics[f"{role}_teacher_score"] = self.mean_across_processes(signal.mean()).item()

        lambdas = self.balance.update({role: metrics[f"L_{ROLE_SUFFIX[role]}"] for role in self.teacher_roles})
        for role in self.teacher_roles:
            metrics[f"lambda_{ROLE_SUFFIX[role]}"] = lambdas[role]
        if student_clean is not None:
            metrics["acc_clean"] = accuracy(student_clean, y)
        metrics["acc_adv"] = accuracy(student_adv, y)
        losses = {role: lambdas[role] * terms[role] for role in self.teacher_roles}
        return MethodOutput(losses=losses, metrics=metrics, x_adv=x_adv.detach())

    def _clean_teacher_logits(self, teacher: nn.Module, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.cache_clean_teacher and index is not None:
            return self.clean_cache.logits(teacher, x, index)
        return teacher_forward(teacher, x)

    def _inner_loss(
        self,
        model: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        clean_teacher_logits: torch.Tensor | None,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> LossFn:
        """The per-sample objective the attack maximises, as a function of the perturbed images."""
        if self.cfg.inner == "ce":
            return cross_entropy_objective(model, y)
        if self.cfg.inner == "kl-clean-teacher":
            target = clean_teacher_logits
        else:  # kl-robust-teacher
            target = teacher_forward(teachers["robust"], x)
        return lambda x_adv: per_sample_kl(target, model(x_adv), self.cfg.temperature)

    def state_dict(self) -> dict:
        return {"balance": self.balance.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.balance.load_state_dict(state["balance"])


@register_method("ard")
class ARD(MMTARD):
    """Single-teacher adversarial distillation with the robust teacher alone (preset ``ard``).

    Inner objective ``KL(P_R(x) || P_S(x + delta))``, loss ``lambda_R * mean_i a_R,i l_R,i``, which is
    ``mean_i l_R,i`` with the preset's ``diw: none`` and ``fixed`` balance ``lambda_robust = 1``. No clean
    teacher and no clean student forward. The robust teacher runs twice when attacking: on ``x`` for the
    inner target, then on ``x'`` (which depends on that target, so the two cannot share a batch).
    """

    teacher_roles = ("robust",)
    inner_objectives = ("kl-robust-teacher", "ce")
