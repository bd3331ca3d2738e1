"""MMT-ARD: multimodal multi-teacher adversarial distillation (Li, Dong, Yang et al., arXiv 2511.17448),
and its single-teacher special case ARD with the robust teacher alone.

One step (spec section 2): clean-teacher logits on ``x``; ``x'`` by PGD on the inner objective; robust-
teacher logits on ``x'`` (or on ``x`` with ``robust_target: clean``, as RSLAD); student logits on ``x`` and
``x'``; per-sample terms ``l_R,i = KL(P_R(x'_i) || P_S(x'_i))`` and ``l_C,i = KL(P_C(x_i) || P_S(x_i))``; DIW
weights ``a_k,i``; ``L_k = mean_i a_k,i l_k,i``; loss ``sum_k lambda_k L_k`` with the balance's ``lambda_k``.

K teachers: any number of named teachers, each of kind ``clean`` (its term reads it on ``x``, the student on
``x``) or ``robust`` (it on ``x'``, or on ``x`` with ``robust_target: clean``; the student on ``x'``); the balance
runs over all K terms. The two standard teachers are named ``clean`` and ``robust``.

Teachers pass knowledge through their class-text distributions only, so teacher and student embedding
sizes may differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from mmtard.methods.balance import create_balance
from mmtard.methods.base import (
    CleanImageOutputs,
    Method,
    MethodOutput,
    host_floats,
    student_forward_pair,
    teacher_forward,
    unwrap,
)
from mmtard.methods.config import MethodConfig
from mmtard.methods.logit_cache import LogitCache
from mmtard.methods.losses import accuracy_shortfall, batch_accuracy, per_sample_kl
from mmtard.methods.registry import register_method
from mmtard.methods.teachers import TeacherPlan, fixed_weights, metric_suffix
from mmtard.methods.weighting import WeightingSettings, importance_weights


@dataclass(frozen=True)
class TeacherStatistics:
    """One teacher term's batch statistics: tensors on the device in a step, python floats once read.

    Attributes:
        term: ``L_k``, its cross-process mean (logged ``L_<suffix>``; the balance's input).
        score: the DIW signal's batch mean (logged ``<name>_teacher_score``).
        shortfall: the teacher's accuracy minus the student's, floored at 0 (``shortfall_<suffix>``).
    """

    term: torch.Tensor | float
    score: torch.Tensor | float
    shortfall: torch.Tensor | float

    def values(self) -> tuple:
        """``(term, score, shortfall)``, the order :class:`TeacherStatistics` takes them back."""
        return self.term, self.score, self.shortfall

    def metrics(self, name: str) -> dict[str, float]:
        """The logged names of teacher ``name``'s statistics (:func:`metric_suffix`)."""
        suffix = metric_suffix(name)
        return {f"L_{suffix}": self.term, f"{name}_teacher_score": self.score, f"shortfall_{suffix}": self.shortfall}


@register_method("mmt-ard", objective={"clean_input": ("clean", "both")})
@register_method("mmt-ard-adv", objective={"clean_input": ("adversarial",)}, clean_input="adversarial")
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
    """Multi-teacher adversarial distillation with DIW and an adaptive balance (presets ``mmt-ard``,
    ``mmt-ard-adv``, ``reference``).

    ``mmt-ard`` is the seed's objective: the clean teacher on the student's clean output ``P_S(x)`` (clean feature
    preservation), the robust teacher on ``P_S(x')`` (robust feature enhancement), DIW and an adaptive balance;
    ``clean_input`` may be ``clean`` or ``both``, never ``adversarial``, which drops the ``P_S(x)`` term.
    ``mmt-ard-adv`` is that variant (``clean_input: adversarial``: the clean teacher's ``P_C(x)`` as the soft label
    of ``x'``; spec 2.7). ``reference`` is this class with ``diw: reference`` and the ``fixed`` 1/1 balance, as in
    the released training script.

    Args:
        cfg: the method's config.
        teachers: the :class:`TeacherPlan`, or teacher name -> kind (``clean`` or ``robust``), at least one robust;
            None for the two standard teachers ``{"clean": "clean", "robust": "robust"}``.
    """

    standard_teachers = MappingProxyType({"clean": "clean", "robust": "robust"})
    accepted_kinds = ("clean", "robust")
    inner_objectives = ("kl-clean-teacher", "kl-robust-teacher", "ce")

    def __init__(self, cfg: MethodConfig, teachers: TeacherPlan | Mapping[str, str] | None = None):
        super().__init__(cfg, teachers)
        self.balance = create_balance(
            cfg.balance,
            self.teacher_roles,
            momentum=cfg.ema_momentum,
            beta=cfg.beta,
            eta=cfg.eta,
            fixed=fixed_weights(self.teacher_roles, cfg.lambda_robust, cfg.lambda_clean, cfg.lambdas),
            log_prior={name: math.log(cfg.rho) for name, kind in self.teacher_kinds.items() if kind == "robust"},
        )
        scale = {"robust": cfg.reference_robust_scale, "clean": cfg.reference_clean_scale}
        self.reference_scale = {name: scale[kind] for name, kind in self.teacher_kinds.items()}
        # The student's clean forward: for the clean teachers' terms unless they distil into P_S(x').
        self.uses_clean_images = "clean" in self.teacher_kinds.values() and cfg.clean_input != "adversarial"
        self.disk_caches_pending = cfg.cache_clean_teacher and cfg.cache_dir is not None
        if cfg.cache_clean_teacher and cfg.cache_dir is None:
            self.caches = {name: LogitCache() for name in self.clean_image_readers()}

    def clean_image_readers(self) -> tuple[str, ...]:
        """The teachers whose logits on the clean images a step reads (the ones a cache can serve): every clean
        teacher, the robust ones with ``robust_target: clean``, and the inner objective's teacher."""
        read = {
            name for name, kind in self.teacher_kinds.items() if kind == "clean" or self.cfg.robust_target == "clean"
        }
        read |= set(self.inner_teachers.values())
        return tuple(name for name in self.teacher_roles if name in read)

    def open_logit_caches(
        self,
        rows: int,
        identity: Mapping[str, object] | None = None,
        classes: int | None = None,
        data: Mapping[str, object] | None = None,
    ) -> None:
        """Open the disk-backed fp16 caches of the teachers' clean-image logits (``cache_dir`` set): one
        :class:`LogitCache` folder per teacher whose clean-image logits a step reads
        (:meth:`clean_image_readers`), ``<cache_dir>/<teacher name>``. A no-op without ``cache_dir``.

        Call it once, before the first step. Under several processes call it on rank 0 first with ``classes``
        (it creates the stores), then after a barrier on the others (they open the same files).

        Args:
            rows: the training set's size (dataset indices are ``0..rows-1``).
            identity: teacher name -> what its logits depend on, JSON-serialisable; a folder written for another
                identity is started over. None: each teacher's model as :meth:`build_teachers` loaded it (its
                architecture, weights and weights file) with ``data``. The method adds its own part (the
                teacher's name and kind, ``logit_scale``).
            classes: logits per row (the training label set's size); given, the stores are created now.
            data: what the logits depend on besides the teacher (the dataset, split, image size, classes...).
        """
        if not self.disk_caches_pending:
            return
        if identity is None:
            identity = {name: {**source, **(data or {})} for name, source in self.teacher_sources.items()}
        folder = Path(self.cfg.cache_dir)
        self.caches = {
            name: LogitCache(
                folder / name,
                rows=rows,
                identity={
                    "teacher": name,
                    "kind": self.teacher_kinds[name],
                    "logit_scale": self.cfg.logit_scale,
                    "source": identity.get(name),
                },
                classes=classes,
            )
            for name in self.clean_image_readers()
        }
        self.disk_caches_pending = False

    def term_logits(
        self,
        name: str,
        clean: CleanImageOutputs,
        x_adv: torch.Tensor,
        student_clean: torch.Tensor | None,
        student_adv: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A teacher term's target logits and the student's logits it is compared with (spec 2.5).

        A clean teacher on ``x`` against the student on ``x`` (on ``x'`` with ``clean_input: adversarial``; ``both``
        adds the student on ``x'`` in :meth:`teacher_term`); a robust teacher on ``x'`` (on ``x`` with
        ``robust_target: clean``) against the student on ``x'``.
        """
        if self.teacher_kinds[name] == "clean":
            return clean.logits(name), student_adv if self.cfg.clean_input == "adversarial" else student_clean
        if self.cfg.robust_target == "clean":
            return clean.logits(name), student_adv
        return teacher_forward(self.teachers[name], x_adv), student_adv

    def teacher_term(
        self,
        name: str,
        y: torch.Tensor,
        clean: CleanImageOutputs,
        x_adv: torch.Tensor,
        student_clean: torch.Tensor | None,
        student_adv: torch.Tensor,
    ) -> tuple[torch.Tensor, TeacherStatistics]:
        """Teacher ``name``'s term ``L_k = mean_i a_k,i l_k,i`` (before its weight) and its batch statistics."""
        batch_mean = lambda s: self.mean_across_processes(s.mean())  # noqa: E731
        teacher_logits, student_logits = self.term_logits(name, clean, x_adv, student_clean, student_adv)
        per_sample = per_sample_kl(teacher_logits, student_logits, self.cfg.temperature)
        if self.teacher_kinds[name] == "clean" and self.cfg.clean_input == "both":
            per_sample = (per_sample + per_sample_kl(teacher_logits, student_adv, self.cfg.temperature)) / 2
        settings = WeightingSettings(
            logit_scale=unwrap(self.teachers[name]).logit_scale,
            temperature=self.cfg.diw_temperature,
            reference_scale=self.reference_scale[name],
            batch_mean=batch_mean,
        )
        weights, signal = importance_weights(self.cfg.diw, teacher_logits, y, settings)
        term = (weights * per_sample).mean()
        shortfall = accuracy_shortfall(
            batch_mean(batch_accuracy(teacher_logits, y)), batch_mean(batch_accuracy(student_logits, y))
        )
        return term, TeacherStatistics(self.mean_across_processes(term.detach()), batch_mean(signal), shortfall)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        if self.disk_caches_pending and index is not None:
            raise RuntimeError(
                f"method.cache_dir is set ({self.cfg.cache_dir}): call open_logit_caches(rows=...) before the "
                "first step"
            )
        clean = CleanImageOutputs(self.teachers, x, index, self.caches)
        x_adv = self.adversarial(unwrap(student), clean, y)
        if self.uses_clean_images:
            student_clean, student_adv = student_forward_pair(student, x, x_adv)
        else:
            student_clean, student_adv = None, student(x_adv)
        terms, statistics = {}, {}
        for name in self.teacher_roles:
            terms[name], statistics[name] = self.teacher_term(name, y, clean, x_adv, student_clean, student_adv)
        accuracies = {"acc_adv": batch_accuracy(student_adv, y)}
        if student_clean is not None:
            accuracies = {"acc_clean": batch_accuracy(student_clean, y), **accuracies}
        # one host sync: every statistic and accuracy leaves the device together
        flat = [*(value for stats in statistics.values() for value in stats.values()), *accuracies.values()]
        values = iter(host_floats(flat))
        read = {name: TeacherStatistics(*(next(values) for _ in range(3))) for name in statistics}
        lambdas = self.balance.update(
            {name: stats.term for name, stats in read.items()}, {name: stats.shortfall for name, stats in read.items()}
        )
        metrics: dict[str, float] = {}
        for name, stats in read.items():
            metrics.update(stats.metrics(name))
        metrics.update({f"lambda_{metric_suffix(name)}": lambdas[name] for name in self.teacher_roles})
        metrics.update({key: 100.0 * next(values) for key in accuracies})
        losses = {name: lambdas[name] * terms[name] for name in self.teacher_roles}
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

    Several robust teachers (teachers of kind ``robust`` only) give one term each, weighted by the
    balance (``fixed``: ``lambda_robust`` for the teacher named ``robust``, ``lambdas`` for the others); the inner
    objective reads ``inner_teacher`` (the first robust teacher by default).
    """

    standard_teachers = MappingProxyType({"robust": "robust"})
    accepted_kinds = ("robust",)
    inner_objectives = ("kl-robust-teacher", "ce")
