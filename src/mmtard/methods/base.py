"""What every training method shares: the ``Method`` interface, its output, and the forward helpers.

A method computes one training step's loss (spec section 2) for a student and a mapping of frozen
teachers, keyed by name (the rules of names and kinds: :mod:`mmtard.methods.teachers`):

- distilling methods (``mmt-ard``, ``reference``, ``ard``) take named teachers of kind ``clean`` or ``robust``;
  by default the two standard teachers ``"clean"`` and ``"robust"``; any number with
  ``create_method(cfg, teachers)`` (a :class:`~mmtard.methods.teachers.TeacherPlan` or name -> kind);
- FARE and PMG-AFT read ``"original"``: a frozen copy of the student's starting model ``O``.

The method owns its teachers (:meth:`Method.build_teachers` loads them, :meth:`Method.use_teachers` takes given ones;
either freezes them once, into ``method.teachers``, an ``nn.ModuleDict``; :meth:`Method.compile_teachers` compiles
them), their clean-image logit caches and the caches' identity, and the cross-process mean of its batch statistics.
A step is ``method(student, x, y, index)``.

It returns named loss terms (the trainer sums them and backpropagates) and diagnostics. It has no
optimizer, DDP or logging code: a DistributedDataParallel student is unwrapped for the attack, and the
wrapper is called exactly for the training forwards whose outputs the loss uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from mmtard.attacks.functional import pgd
from mmtard.distributed import all_reduce_mean
from mmtard.errors import ConfigError
from mmtard.fileio import weights_stamp
from mmtard.methods.config import MethodConfig
from mmtard.methods.inner import INNER_OBJECTIVES, InnerContext, LossFn
from mmtard.methods.logit_cache import LogitCache
from mmtard.methods.teachers import ORIGINAL, TeacherPlan, plan_teachers
from mmtard.models import CLIPBundle, build_zero_shot_classifier, load_clip
from mmtard.models.checkpoint_file import non_finite_tensors

logger = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper; the model itself otherwise."""
    return getattr(model, "module", model)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then give every submodule back its own previous mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` contains a batch-norm layer (whose batch statistics forbid concatenated batches)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def freeze(teacher: nn.Module) -> None:
    """Eval mode and no parameter gradients, for a teacher or a frozen original model."""
    teacher.eval()
    teacher.requires_grad_(False)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
    """A frozen model's logits (or unnormalised features), without gradient."""
    return teacher(x, return_features=return_features)


def student_forward_pair(student: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's training logits on ``x`` and ``x_adv``.

    One forward of ``torch.cat([x, x_adv])`` through the (possibly wrapped) student, split in two; two
    separate forwards when the image tower has batch norm, so each batch keeps its own statistics.
    """
    if has_batch_norm(unwrap(student).visual):
        return student(x), student(x_adv)
    logits = student(torch.cat([x, x_adv]))
    return logits[: x.shape[0]], logits[x.shape[0] :]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Batch top-1 accuracy in percent."""
    return 100.0 * (logits.detach().argmax(dim=-1) == y).float().mean().item()


def host_floats(values: list[torch.Tensor]) -> list[float]:
    """0-d tensors as python floats with one device synchronisation (one copy of one stacked tensor).

    Each value is exactly its own ``.item()``: float32 and float16 widen to float64 without rounding.
    """
    return torch.stack([v.detach().to(torch.float64) for v in values]).tolist()


@dataclass
class MethodOutput:
    """One step's result.

    Attributes:
        losses: named, already weighted loss terms; the trainer backpropagates their sum.
        metrics: python floats for logging (``L_R``, ``L_C``, ``lambda_R``, ``L_<name>``, ``lambda_<name>``,
            ``acc_adv``...).
        x_adv: the adversarial images ``x'`` of the step (detached), for inspection and tests.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    x_adv: torch.Tensor | None = None

    def total(self) -> torch.Tensor:
        """The loss to backpropagate: the sum of the named terms."""
        return sum(self.losses.values())


class CleanImageOutputs:
    """The frozen models' outputs on one step's clean images ``x``, each computed at most once.

    Args:
        teachers: frozen models by role.
        x: ``(B, 3, H, W)`` clean images.
        index: ``(B,)`` dataset indices, or ``None``.
        caches: role -> :class:`LogitCache` for the roles whose clean-image logits are cached across steps
            (used when ``index`` is given).
    """

    def __init__(
        self,
        teachers: Mapping[str, nn.Module],
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        caches: Mapping[str, LogitCache] | None = None,
    ):
        self.teachers, self.x, self.index, self.caches = teachers, x, index, caches or {}
        self._logits: dict[str, torch.Tensor] = {}
        self._features: dict[str, torch.Tensor] = {}

    def logits(self, role: str) -> torch.Tensor:
        """Teacher ``role``'s logits on ``x``."""
        if role not in self._logits:
            cache = self.caches.get(role)
            if cache is not None and self.index is not None:
                self._logits[role] = cache.logits(self.teachers[role], self.x, self.index)
            else:
                self._logits[role] = teacher_forward(self.teachers[role], self.x)
        return self._logits[role]

    def features(self, role: str) -> torch.Tensor:
        """Model ``role``'s unnormalised image features on ``x``."""
        if role not in self._features:
            self._features[role] = teacher_forward(self.teachers[role], self.x, return_features=True)
        return self._features[role]


class Method:
    """One training step's loss. Subclasses set ``inner_objectives`` and their teachers, implement ``step``.

    A distilling subclass sets ``standard_teachers`` (name -> kind, its teachers when none are given) and
    ``accepted_kinds``; one that reads the frozen copy of the starting student sets ``reads_original``. These
    class attributes are what :func:`mmtard.methods.teachers.plan_teachers` reads; an instance keeps the resulting
    :class:`TeacherPlan` (``plan``) and answers every teacher question from it.

    Args:
        cfg: the method's config (validated here).
        teachers: the method's :class:`TeacherPlan`, or teacher name -> kind (``clean`` or ``robust``), exactly the
            teachers it distils from; None for the method's standard teachers. A method without distillation
            teachers takes None or an empty mapping.

    Raises:
        ConfigError: an invalid config, an inner objective this method cannot compute, or teachers it cannot
            take (naming ``teachers.<name>.kind``).
    """

    inner_objectives: tuple[str, ...] = ()
    standard_teachers: Mapping[str, str] = MappingProxyType({})
    accepted_kinds: tuple[str, ...] = ()
    reads_original: bool = False  # FARE, PMG-AFT: a frozen copy of the starting student, named ``original``

    @staticmethod
    def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
        """Mean of a per-process statistic over all processes (:func:`mmtard.distributed.all_reduce_mean`); the
        identity in one process. Under DistributedDataParallel, batch means (DIW) and the balance's teacher terms
        are those of the global batch, and every process computes the same weights."""
        return all_reduce_mean(value)

    def __init__(self, cfg: MethodConfig, teachers: TeacherPlan | Mapping[str, str] | None = None):
        self.cfg = cfg.validate()
        if not isinstance(teachers, TeacherPlan):
            teachers = plan_teachers(type(self), self.cfg, teachers, exact=True)
        self.plan = teachers
        self.caches: dict[str, LogitCache] = {}
        self.teachers = nn.ModuleDict()  # the frozen models of teacher_roles, by name: build_teachers / use_teachers
        self.teacher_sources: dict[str, dict] = {}  # teacher name -> its model's identity, for the logit caches
        self._checked_student: nn.Module | None = None  # the student whose tower the teachers were checked against

    @property
    def teacher_kinds(self) -> Mapping[str, str]:
        """Teacher name -> kind, in order (:attr:`TeacherPlan.kinds`)."""
        return self.plan.kinds

    @property
    def teacher_roles(self) -> tuple[str, ...]:
        """Every frozen model the step reads (:attr:`TeacherPlan.roles`)."""
        return self.plan.roles

    @property
    def inner_teachers(self) -> Mapping[str, str]:
        """Kind -> the teacher the ``kl-*`` inner objective reads (:attr:`TeacherPlan.inner`)."""
        return self.plan.inner

    def build_teachers(
        self,
        sources: Mapping[str, object],
        student: CLIPBundle,
        classnames: list[str],
        templates: list[str],
        device: torch.device | str | None = None,
    ) -> nn.ModuleDict:
        """Load, freeze and keep (``self.teachers``) a zero-shot classifier of every model the step reads, by name.

        Args:
            sources: teacher name -> its model (anything with ``arch``, ``pretrained`` and ``trust_checkpoint``, such
                as a run config's teacher); only the method's own teachers are read.
            student: the student's bundle before training: ``original`` is a frozen copy of it.
            classnames, templates: the training label set, for the text prototypes.
            device: where the teachers are loaded.

        Returns:
            ``self.teachers``: name -> frozen classifier (eval mode, no parameter gradients), an ``nn.ModuleDict``.
        """
        teachers = {}
        for name in self.teacher_roles:
            if name == ORIGINAL:
                bundle = student.frozen_copy()
            else:
                spec = sources[name]
                vision_weights = getattr(spec, "vision_weights", None)
                vision_alpha = getattr(spec, "vision_weights_alpha", 1.0)
                bundle = load_clip(
                    spec.arch,
                    spec.pretrained,
                    device=device,
                    trust_checkpoint=spec.trust_checkpoint,
                    vision_weights=vision_weights,
                    vision_weights_alpha=vision_alpha,
                    vision_field=f"teachers.{name}.vision_weights",
                )
                bad = non_finite_tensors(bundle.model.state_dict())
                if bad:
                    raise ConfigError(
                        f"teachers.{name}.pretrained: '{spec.pretrained}' holds non-finite weights (NaN or inf in "
                        f"{len(bad)} tensor(s): {', '.join(bad[:3])}); a diverged run? Nothing was written"
                    )
                self.teacher_sources[name] = {
                    "arch": spec.arch,
                    "pretrained": spec.pretrained,
                    "weights_file": weights_stamp(spec.pretrained),
                }
                if vision_weights is not None:  # the logit caches' identity: another tower is another teacher
                    self.teacher_sources[name] |= {
                        "vision_weights": vision_weights,
                        "vision_weights_file": weights_stamp(vision_weights),
                        "vision_weights_alpha": vision_alpha,
                    }
            freeze(bundle.model)
            teachers[name] = build_zero_shot_classifier(bundle, classnames, templates, self.cfg.logit_scale)
        return self.use_teachers(teachers).teachers

    def use_teachers(self, teachers: Mapping[str, nn.Module]) -> Method:
        """Make ``teachers`` (name -> model) this method's own, frozen (eval mode, no parameter gradients) once, here.

        Args:
            teachers: must hold every name of ``teacher_roles``; other names are ignored.

        Returns:
            The method itself, so ``method.use_teachers(teachers)(student, x, y)`` reads.

        Raises:
            ConfigError: a name of ``teacher_roles`` is missing.
        """
        missing = [role for role in self.teacher_roles if role not in teachers]
        if missing:
            raise ConfigError(
                f"teachers: method '{self.cfg.name}' needs teachers {self.teacher_roles}; missing {tuple(missing)}"
            )
        self.teachers = nn.ModuleDict({role: teachers[role] for role in self.teacher_roles})
        for teacher in self.teachers.values():
            freeze(teacher)
        self._checked_student = None
        return self

    def compile_teachers(self) -> None:
        """``torch.compile`` every teacher in place (``nn.Module.compile``, ``dynamic=False``: a step's shapes are
        fixed), as ``train.compile`` asks; parameters and state-dict names stay as they are."""
        for teacher in self.teachers.values():
            teacher.compile(dynamic=False)

    def open_logit_caches(
        self,
        rows: int,
        identity: Mapping[str, object] | None = None,
        classes: int | None = None,
        data: Mapping[str, object] | None = None,
    ) -> None:
        """Open the disk-backed clean-image logit caches of ``cfg.cache_dir`` (a no-op for methods without).

        See :meth:`MMTARD.open_logit_caches <mmtard.methods.mmt_ard.MMTARD.open_logit_caches>`.
        """

    @property
    def attacking(self) -> bool:
        """Whether the step perturbs its inputs (:attr:`MethodConfig.attacking`)."""
        return self.cfg.attacking

    def __call__(
        self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None
    ) -> MethodOutput:
        """Compute one step's loss terms with this method's frozen teachers (:meth:`build_teachers` or
        :meth:`use_teachers`).

        Args:
            student: the student ``ZeroShotClassifier``, possibly wrapped in DistributedDataParallel, in
                train mode. The first call with a student checks that no teacher shares its image tower.
            x: ``(B, 3, H, W)`` images in ``[0, 1]``.
            y: ``(B,)`` labels in the student's (and teachers') label set.
            index: ``(B,)`` dataset indices, for the clean-teacher cache.

        Returns:
            The named loss terms, diagnostics and the adversarial images.

        Raises:
            ConfigError: a teacher is missing (none were given), or one shares its image tower with the student.
        """
        if unwrap(student) is not self._checked_student:
            self._check_teachers_for(student)
        return self.step(student, x, y, index)

    def _check_teachers_for(self, student: nn.Module) -> None:
        """Every teacher is there and none shares its image tower with ``student``; remembered for that student."""
        missing = [role for role in self.teacher_roles if role not in self.teachers]
        if missing:
            raise ConfigError(
                f"teachers: method '{self.cfg.name}' needs teachers {self.teacher_roles}; missing {tuple(missing)}"
            )
        for role in self.teacher_roles:
            if unwrap(self.teachers[role]).visual is unwrap(student).visual:
                raise ConfigError(
                    f"teachers: the '{role}' model shares its image tower with the student; pass a frozen copy"
                )
        self._checked_student = unwrap(student)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> MethodOutput:
        raise NotImplementedError

    def attack(self, model: nn.Module, loss_fn: LossFn, x: torch.Tensor) -> torch.Tensor:
        """PGD maximising the per-sample ``loss_fn`` with the config's budget, ``model`` in eval mode meanwhile.

        ``model`` is the unwrapped student; callers check :attr:`attacking` first.
        """
        with eval_mode(model):
            cfg = self.cfg
            return pgd(loss_fn, x, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, norm=cfg.norm)

    def adversarial(self, model: nn.Module, clean: CleanImageOutputs, y: torch.Tensor) -> torch.Tensor:
        """``x'`` by PGD on the config's inner objective (spec 2.2), or ``x`` itself when not attacking.

        Args:
            model: the unwrapped student.
            clean: the frozen models' outputs on the clean images, which the objective may use.
            y: ``(B,)`` labels.
        """
        if not self.attacking:
            return clean.x
        context = InnerContext(model, y, self.cfg.temperature, clean.logits, clean.features, self.inner_teachers)
        return self.attack(model, INNER_OBJECTIVES.get(self.cfg.inner)(context), clean.x)

    def state_dict(self) -> dict:
        """State that must survive a resume (empty for stateless methods)."""
        return {}

    def logit_cache_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The in-memory clean-image logit caches' rows by teacher (:meth:`LogitCache.state_dict`; ``{}`` without
        them: disk caches keep their rows themselves). Each process has its own; a checkpoint saves each one's."""
        states = {name: cache.state_dict() for name, cache in self.caches.items()}
        return {name: state for name, state in states.items() if state is not None}

    def load_logit_cache_state(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore :meth:`logit_cache_state`'s rows into this method's caches of the same teachers."""
        for name, rows in state.items():
            if name in self.caches:
                self.caches[name].load_state_dict(dict(rows))

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s output."""
