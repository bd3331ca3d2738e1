"""MMT-ARD: multimodal multi-teacher adversarial distillation (Li, Dong, Yang et al., arXiv 2511.17448),
and its single-teacher special case ARD with the robust teacher alone.

One step (spec section 2): clean-teacher logits on ``x``; ``x'`` by PGD on the inner objective; robust-
teacher logits on ``x'`` (or on ``x`` with ``robust_target: clean``, as RSLAD); student logits on ``x`` and
``x'``; per-sample terms ``l_R,i = KL(P_R(x'_i) || P_S(x'_i))`` and ``l_C,i = KL(P_C(x_i) || P_S(x_i))``; DIW
weights ``a_k,i``; ``L_k = mean_i a_k,i l_k,i``; loss ``sum_k lambda_k L_k`` with the balance's ``lambda_k``.

Teachers pass knowledge through their class-text distributions only, so teacher and student embedding
sizes may differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from mmtard.methods.balance import create_balance
from mmtard.methods.base import (
    CleanImageOutputs,
    LogitCache,
    Method,
    MethodOutput,
    accuracy,
    student_forward_pair,
    teacher_forward,
    unwrap,
)
from mmtard.methods.config import MethodConfig
from mmtard.methods.losses import accuracy_shortfall, batch_accuracy, per_sample_kl
from mmtard.methods.registry import register_method
from mmtard.methods.weighting import WeightingSettings, importance_weights
from mmtard.models.zeroshot import ZeroShotClassifier

# Metric suffix of each teacher role: L_R, lambda_R, robust_teacher_score; L_C, lambda_C, clean_teacher_score.
ROLE_SUFFIX = {"robust": "R", "clean": "C"}


@register_method("mmt-ard")
@register_method(
    "reference",
    inner="kl-clean-teacher",
    diw="reference",
    balance="fixed",
    lambda_robust=1.0,
    lambda_clean=1.0,
    alpha=1 / 255,
)
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
            momentum=cfg.ema_momentum,
            beta=cfg.beta,
            eta=cfg.eta,
            fixed={"robust": cfg.lambda_robust, "clean": cfg.lambda_clean},
            log_prior={"robust": math.log(cfg.rho)},
        )
        self.reference_scale = {"robust": cfg.reference_robust_scale, "clean": cfg.reference_clean_scale}
        self.caches = {role: LogitCache() for role in self.teacher_roles} if cfg.cache_clean_teacher else {}

    def step(
        self,
        student: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None,
    ) -> MethodOutput:
        model = unwrap(student)
        clean = CleanImageOutputs(teachers, x, index, self.caches)
        x_adv = self.adversarial(model, clean, y)
        has_clean = "clean" in self.teacher_roles
        if has_clean:
            student_clean, student_adv = student_forward_pair(student, x, x_adv)
        else:
            student_clean, student_adv = None, student(x_adv)

        # Each term's target logits and the student's logits it is compared with.
        if self.cfg.robust_target == "clean":
            robust_target = clean.logits("robust")
        else:
            robust_target = teacher_forward(teachers["robust"], x_adv)
        pairs = {"robust": (robust_target, student_adv)}
        if has_clean:
            pairs["clean"] = (clean.logits("clean"), student_clean)

        terms: dict[str, torch.Tensor] = {}
        shortfalls: dict[str, float] = {}
        metrics: dict[str, float] = {}
        batch_mean = lambda s: self.mean_across_processes(s.mean())  # noqa: E731
        for role in self.teacher_roles:
            teacher_logits, student_logits = pairs[role]
            per_sample = per_sample_kl(teacher_logits, student_logits, self.cfg.temperature)
            settings = WeightingSettings(
                logit_scale=unwrap(teachers[role]).logit_scale,
                temperature=self.cfg.diw_temperature,
                reference_scale=self.reference_scale[role],
                batch_mean=batch_mean,
            )
            weights, signal = importance_weights(self.cfg.diw, teacher_logits, y, settings)
            terms[role] = (weights * per_sample).mean()
            suffix = ROLE_SUFFIX[role]
            metrics[f"L_{suffix}"] = self.mean_across_processes(terms[role].detach()).item()
            metrics[f"{role}_teacher_score"] = batch_mean(signal).item()
            shortfalls[role] = accuracy_shortfall(
                batch_mean(batch_accuracy(teacher_logits, y)), batch_mean(batch_accuracy(student_logits, y))
            ).item()
            metrics[f"shortfall_{suffix}"] = shortfalls[role]

        lambdas = self.balance.update(
            {role: metrics[f"L_{ROLE_SUFFIX[role]}"] for role in self.teacher_roles}, shortfalls
        )
        for role in self.teacher_roles:
            metrics[f"lambda_{ROLE_SUFFIX[role]}"] = lambdas[role]
        if student_clean is not None:
            metrics["acc_clean"] = accuracy(student_clean, y)
        metrics["acc_adv"] = accuracy(student_adv, y)
        losses = {role: lambdas[role] * terms[role] for role in self.teacher_roles}
        return MethodOutput(losses=losses, metrics=metrics, x_adv=x_adv.detach())

    def state_dict(self) -> dict:
        return {"balance": self.balance.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.balance.load_state_dict(state["balance"])


@register_method("ard", inner="kl-robust-teacher", diw="none", balance="fixed", lambda_robust=1.0)
class ARD(MMTARD):
    """Single-teacher adversarial distillation with the robust teacher alone (preset ``ard``).

    Inner objective ``KL(P_R(x) || P_S(x + delta))``, loss ``lambda_R * mean_i a_R,i l_R,i``, which is
    ``mean_i l_R,i`` with the preset's ``diw: none`` and ``fixed`` balance ``lambda_robust = 1``. No clean
    teacher and no clean student forward. The robust teacher runs twice when attacking: on ``x`` for the
    inner target, then on ``x'`` (which depends on that target, so the two cannot share a batch); once with
    ``robust_target: clean`` (RSLAD), whose target is the inner objective's.
    """

    teacher_roles = ("robust",)
    inner_objectives = ("kl-robust-teacher", "ce")
