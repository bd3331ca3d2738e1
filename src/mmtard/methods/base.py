"""What every training method shares: the ``Method`` interface, its output, and the forward helpers.

A method computes one training step's loss (spec section 2) for a student and a mapping of frozen
teachers, keyed by name (the rules of names and kinds: :mod:`mmtard.methods.teachers`):

- distilling methods (``mmt-ard``, ``reference``, ``ard``) take named teachers of kind ``clean`` or ``robust``;
  by default the two standard teachers ``"clean"`` and ``"robust"``; any number with
  ``create_method(cfg, teacher_kinds)``;
- FARE and PMG-AFT read ``"original"``: a frozen copy of the student's starting model ``O``.

The method owns its teachers (:meth:`Method.build_teachers` loads and freezes them), their clean-image logit
caches and the caches' identity, and the cross-process mean of its batch statistics.

It returns named loss terms (the trainer sums them and backpropagates) and diagnostics. It has no
optimizer, DDP or logging code: a DistributedDataParallel student is unwrapped for the attack, and the
wrapper is called exactly for the training forwards whose outputs the loss uses.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from mmtard.attacks.functional import pgd
from mmtard.distributed import all_reduce_mean
from mmtard.errors import ConfigError
from mmtard.fileio import atomic_write_text, weights_stamp
from mmtard.methods.config import MethodConfig
from mmtard.methods.inner import INNER_OBJECTIVES, InnerContext, LossFn
from mmtard.methods.teachers import (  # noqa: F401 (TEACHER_KINDS, TEACHER_ROLES, metric_suffix: re-exported)
    ORIGINAL,
    TEACHER_KINDS,
    TEACHER_ROLES,
    choose_inner_teachers,
    metric_suffix,
    resolve_teacher_kinds,
    select_teachers,
)
from mmtard.models import CLIPBundle, build_zero_shot_classifier, load_clip
from mmtard.models.zeroshot import ZeroShotClassifier

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


class LogitCache:
    """Per-dataset-index logits of a frozen model, computed on first sight and reused (spec 2.1).

    Only correct when the image of an index never changes between epochs: enable it for deterministic
    pipelines (no random augmentation) only. Not part of ``state_dict``.

    Two stores:

    - in memory (the default, ``cache_dir=None``): float32 rows exactly as the model computed them, in CPU
      memory (``N x K`` floats: 17.5k x 5 on the CPU protocol, 1.28M x 1000 = 5 GB on ImageNet). After a
      resume the rows are recomputed, with the same values.
    - on disk (``cache_dir``): an fp16 memory-mapped array of ``rows x K`` (``logits.npy``, 2.6 GB for
      ImageNet, paged in by the OS, no RAM of its own), a filled-row mask (``filled.npy``, one byte per row)
      and ``cache.json`` (rows, classes, ``identity``). Rows survive the process: a resumed or later run
      with the same ``identity`` reuses them and forwards only rows never seen. **fp16 rounding applies**:
      every row, the first time too, is returned as stored, rounded to fp16 (relative error at most
      2**-11, e.g. 0.008 on a logit of 30), so every epoch sees the same values; logits beyond fp16's
      range (65504) are refused. Rows are written before their mask entries (each flushed), so a crash
      leaves at worst rows computed again, never a marked row that was not written; a folder whose
      ``cache.json`` is missing, unreadable or of another ``identity`` is started over. Under several
      processes (DDP), construct the cache with ``classes`` on rank 0 first (it creates the files then),
      then, after a barrier, on the others (they open them): the processes share the files, each writing
      the rows of its own indices.

    Args:
        cache_dir: a folder for the disk store; None keeps the rows in memory.
        rows: the dataset's size (required with ``cache_dir``): indices are ``0..rows-1``.
        identity: what the logits depend on (the model and its weights, the dataset, split, image size,
            classes...), JSON-serialisable; a folder written for another identity is started over.
        classes: logits per row; given, a missing store is created here, else at the first forward.

    Raises:
        ConfigError: ``cache_dir`` without a positive ``rows``, or a path that is not a folder.
    """

    LOGITS_FILE = "logits.npy"
    FILLED_FILE = "filled.npy"
    META_FILE = "cache.json"
    FP16_MAX = 65504.0

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        rows: int | None = None,
        identity: object = None,
        classes: int | None = None,
    ) -> None:
        self._rows: dict[int, torch.Tensor] = {}
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.num_rows = rows
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self._logits: np.ndarray | None = None  # the disk store's (rows, K) float16 memmap, once open
        self._filled: np.ndarray | None = None  # its (rows,) bool memmap
        if self.cache_dir is not None:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ConfigError(f"cache_dir: a disk cache needs rows = the dataset's size (>= 1), got {rows!r}")
            if self.cache_dir.exists() and not self.cache_dir.is_dir():
                raise ConfigError(f"cache_dir: '{self.cache_dir}' is a file, expected a folder")
            self._open_existing()
            if self._logits is None and classes is not None:
                self._create(classes)

    def __len__(self) -> int:
        if self.cache_dir is None:
            return len(self._rows)
        return 0 if self._filled is None else int(np.count_nonzero(self._filled))

    def logits(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` on ``x`` whose rows have dataset indices ``index``; forwards only unseen rows."""
        if self.cache_dir is not None:
            return self._disk_logits(model, x, index)
        keys = index.tolist()
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        if missing:
            computed = teacher_forward(model, x[missing]).float().cpu()
            for i, row in zip(missing, computed):
                self._rows[keys[i]] = row.clone()
        return torch.stack([self._rows[key] for key in keys]).to(x.device, non_blocking=True)

    def _disk_logits(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        keys = index.detach().cpu().numpy().astype(np.int64)
        if keys.size and (keys.min() < 0 or keys.max() >= self.num_rows):
            raise ConfigError(
                f"cache_dir: dataset index {int(keys.max() if keys.max() >= self.num_rows else keys.min())} is "
                f"outside the cache's rows 0..{self.num_rows - 1} (rows must be the dataset's size)"
            )
        missing = np.arange(len(keys)) if self._filled is None else np.flatnonzero(~self._filled[keys])
        if missing.size:
            computed = teacher_forward(model, x[torch.from_numpy(missing).to(x.device)]).float().cpu().numpy()
            self._write_rows(keys[missing], computed)
        rows = np.asarray(self._logits[keys], dtype=np.float32)
        return torch.from_numpy(rows).to(x.device, non_blocking=True)

    def _write_rows(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (float32 ``(n, K)``) at rows ``keys``: rows first, then their mask entries."""
        if self._logits is None:
            self._create(values.shape[1])
        elif values.shape[1] != self._logits.shape[1]:
            raise ConfigError(
                f"cache_dir: '{self.cache_dir}' holds {self._logits.shape[1]} logits per row, the model gives "
                f"{values.shape[1]}; give each label set its own folder (or identity)"
            )
        largest = float(np.abs(values).max()) if values.size else 0.0
        if not largest <= self.FP16_MAX:
            raise ConfigError(
                f"cache_dir: the model's logits reach {largest:g}, beyond fp16's range ({self.FP16_MAX:g}); "
                "keep this cache in memory"
            )
        self._logits[keys] = values.astype(np.float16)
        self._logits.flush()
        self._filled[keys] = True
        self._filled.flush()

    def _paths(self) -> tuple[Path, Path, Path]:
        return self.cache_dir / self.LOGITS_FILE, self.cache_dir / self.FILLED_FILE, self.cache_dir / self.META_FILE

    def _open_existing(self) -> None:
        """Open the folder's store if ``cache.json`` describes this cache and the arrays match it."""
        logits_path, filled_path, meta_path = self._paths()
        if not meta_path.is_file():
            return
        try:
            meta = json.loads(meta_path.read_text())
            matches = meta["rows"] == self.num_rows and meta["identity"] == self.identity
            if matches:
                logits = np.lib.format.open_memmap(logits_path, mode="r+")
                filled = np.lib.format.open_memmap(filled_path, mode="r+")
                shapes_match = logits.shape == (self.num_rows, meta["classes"]) and filled.shape == (self.num_rows,)
                if shapes_match and logits.dtype == np.float16 and filled.dtype == np.bool_:
                    self._logits, self._filled = logits, filled
                    logger.info("%s: reusing %d of %d cached rows", self.cache_dir, len(self), self.num_rows)
                    return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logger.warning("%s: written for another cache (or incomplete); starting it over", self.cache_dir)

    def _create(self, classes: int) -> None:
        """A new store of ``rows x classes``: arrays first, then ``cache.json`` (atomically), which marks it valid."""
        logits_path, filled_path, meta_path = self._paths()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # until the arrays exist, the folder is not a valid cache
        logits = np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float16, shape=(self.num_rows, classes))
        filled = np.lib.format.open_memmap(filled_path, mode="w+", dtype=np.bool_, shape=(self.num_rows,))
        logits.flush()
        filled.flush()
        meta = {"format": 1, "rows": self.num_rows, "classes": classes, "dtype": "float16", "identity": self.identity}
        atomic_write_text(meta_path, json.dumps(meta, sort_keys=True, indent=2))
        self._logits, self._filled = logits, filled


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
    ``accepted_kinds``; one that reads the frozen copy of the starting student sets ``reads_original``. An
    instance's ``teacher_kinds`` maps each of its teachers to its kind, in order, and ``teacher_roles`` names
    every frozen model its step reads: the teachers, then ``original`` when it reads it. Static questions (which
    teachers a preset takes) are class methods: :meth:`select_teachers`, :meth:`plan_teachers`.

    Args:
        cfg: the method's config (validated here).
        teacher_kinds: teacher name -> kind (``clean`` or ``robust``); None for the method's standard teachers.
            A method without distillation teachers takes None or an empty mapping.

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

    @classmethod
    def select_teachers(cls, method: str, configured: Mapping[str, str | None]) -> dict[str, str] | None:
        """The configured teachers (name -> kind, or None for a kind implied by the name) this class distils from;
        None for a class without distillation teachers (:func:`mmtard.methods.teachers.select_teachers`)."""
        return select_teachers(method, configured, cls.standard_teachers, cls.accepted_kinds)

    @classmethod
    def plan_teachers(cls, cfg: MethodConfig, teacher_kinds: Mapping[str, str] | None = None) -> dict[str, str]:
        """The teachers (name -> kind) an instance for ``cfg`` and ``teacher_kinds`` would have, checked against
        the inner objective, without building one.

        Raises:
            ConfigError: as the constructor, for the inner objective and the teachers.
        """
        if cfg.inner not in cls.inner_objectives:
            raise ConfigError(
                f"inner: method '{cfg.name}' supports {', '.join(cls.inner_objectives)}; got {cfg.inner!r}"
            )
        kinds = resolve_teacher_kinds(cfg.name, teacher_kinds, cls.standard_teachers, cls.accepted_kinds)
        choose_inner_teachers(cfg.inner, cfg.inner_teacher, kinds)
        return kinds

    def __init__(self, cfg: MethodConfig, teacher_kinds: Mapping[str, str] | None = None):
        self.cfg = cfg.validate()
        self.teacher_kinds = self.plan_teachers(cfg, teacher_kinds)
        self.teacher_roles: tuple[str, ...] = (*self.teacher_kinds, *((ORIGINAL,) if self.reads_original else ()))
        self.inner_teachers = choose_inner_teachers(cfg.inner, cfg.inner_teacher, self.teacher_kinds)
        self.caches: dict[str, LogitCache] = {}
        self.teachers: dict[str, ZeroShotClassifier] = {}  # filled by build_teachers
        self.teacher_sources: dict[str, dict] = {}  # teacher name -> its model's identity, for the logit caches

    def build_teachers(
        self,
        sources: Mapping[str, object],
        student: CLIPBundle,
        classnames: list[str],
        templates: list[str],
        device: torch.device | str | None = None,
    ) -> dict[str, ZeroShotClassifier]:
        """Load, freeze and keep (``self.teachers``) a zero-shot classifier of every model the step reads, by name.

        Args:
            sources: teacher name -> its model (anything with ``arch``, ``pretrained`` and ``trust_checkpoint``, such
                as a run config's teacher); only the method's own teachers are read.
            student: the student's bundle before training: ``original`` is a frozen copy of it.
            classnames, templates: the training label set, for the text prototypes.
            device: where the teachers are loaded.

        Returns:
            ``self.teachers``: name -> frozen classifier (eval mode, no parameter gradients).
        """
        teachers = {}
        for name in self.teacher_roles:
            if name == ORIGINAL:
                bundle = copy.copy(student)
                bundle.model = copy.deepcopy(student.model)
                bundle._prototype_cache = dict(student._prototype_cache)
            else:
                spec = sources[name]
                bundle = load_clip(spec.arch, spec.pretrained, device=device, trust_checkpoint=spec.trust_checkpoint)
                self.teacher_sources[name] = {
                    "arch": spec.arch,
                    "pretrained": spec.pretrained,
                    "weights_file": weights_stamp(spec.pretrained),
                }
            freeze(bundle.model)
            teachers[name] = build_zero_shot_classifier(bundle, classnames, templates, self.cfg.logit_scale)
            freeze(teachers[name])
        self.teachers = teachers
        return teachers

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
        self,
        student: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> MethodOutput:
        """Compute one step's loss terms.

        Args:
            student: the student ``ZeroShotClassifier``, possibly wrapped in DistributedDataParallel, in
                train mode.
            teachers: frozen models by name; must hold every name of ``teacher_roles`` (others are
                ignored). They are put in eval mode without parameter gradients.
            x: ``(B, 3, H, W)`` images in ``[0, 1]``.
            y: ``(B,)`` labels in the student's (and teachers') label set.
            index: ``(B,)`` dataset indices, for the clean-teacher cache.

        Returns:
            The named loss terms, diagnostics and the adversarial images.
        """
        missing = [role for role in self.teacher_roles if role not in teachers]
        if missing:
            raise ConfigError(
                f"teachers: method '{self.cfg.name}' needs teachers {self.teacher_roles}; missing {tuple(missing)}"
            )
        for role in self.teacher_roles:
            if unwrap(teachers[role]).visual is unwrap(student).visual:
                raise ConfigError(
                    f"teachers: the '{role}' model shares its image tower with the student; pass a frozen copy"
                )
            freeze(teachers[role])
        return self.step(student, teachers, x, y, index)

    def step(
        self,
        student: nn.Module,
        teachers: Mapping[str, ZeroShotClassifier],
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor | None,
    ) -> MethodOutput:
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

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s output."""
