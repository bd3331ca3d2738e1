"""The teacher rules: names, kinds, order, the name-implies-kind default, per-name weights and metric suffixes.

A distilling method (``mmt-ard``, ``mmt-ard-adv``, ``reference``, ``ard``) reads named teachers, each of a kind
(:data:`TEACHER_KINDS`): ``clean`` (a clean teacher ``C``, seen on ``x``) or ``robust`` (a robust teacher ``R``,
seen on ``x'``). The two standard teachers are named after their kinds, ``clean`` and ``robust``: a teacher of
that name has that kind (``kind`` may be left out), keeps the short metric suffixes ``C`` and ``R`` and takes the
``fixed`` balance's ``lambda_clean`` / ``lambda_robust``; any other name needs a kind, names its own metrics
(``L_<name>``) and takes ``lambdas[<name>]``. FARE and PMG-AFT read instead a frozen copy of the starting student,
named :data:`ORIGINAL` (a reserved name).

Which teachers a method reads is one frozen :class:`TeacherPlan`, made by :func:`plan_teachers` from the method's
class, its config and the configured teachers (plain mappings ``{name: kind | None}``, never a run config): config
validation, the trainer, the experiments and the method itself read that plan and ask nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import nn

from mmtard.errors import ConfigError

if TYPE_CHECKING:
    from mmtard.methods.config import MethodConfig

TEACHER_KINDS = ("clean", "robust")
ORIGINAL = "original"  # the frozen copy of the starting student (FARE, PMG-AFT)
TEACHER_ROLES = (*TEACHER_KINDS, ORIGINAL)
# A teacher name: a letter, then letters, digits, '_' or '-' (it names metrics, config fields and cache folders).
TEACHER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
RESERVED_TEACHER_NAMES = (ORIGINAL,)
# The two standard teachers keep their short metric names: L_R, lambda_R, shortfall_R; L_C, lambda_C, shortfall_C.
STANDARD_SUFFIX = {"robust": "R", "clean": "C"}
# The fixed balance's weight of each standard teacher.
STANDARD_LAMBDA_FIELDS = {"robust": "lambda_robust", "clean": "lambda_clean"}
# The teacher a kl-* inner objective reads by default: the standard teacher of its kind.
STANDARD_INNER_TEACHERS = {"clean": "clean", "robust": "robust"}
# The kind of teacher each teacher-based inner objective reads (its clean-image logits); other objectives read none.
INNER_TEACHER_KIND = {"kl-clean-teacher": "clean", "kl-robust-teacher": "robust"}


@dataclass(frozen=True)
class TeacherPlan:
    """The frozen models one method's step reads: made by :func:`plan_teachers`, never changed after.

    Attributes:
        method: the method's (preset's) name.
        kinds: teacher name -> kind (``clean`` or ``robust``), in the order the terms are computed and logged;
            empty for a method without distillation teachers.
        inner: teacher kind -> the name of the teacher a ``kl-*`` inner objective reads (empty for other objectives).
        reads_original: whether the step reads :data:`ORIGINAL`, a frozen copy of the starting student (FARE,
            PMG-AFT).
        unused: configured teachers the method does not distil from (a kind it does not take, or a method without
            teachers): they are not loaded.
    """

    method: str
    kinds: Mapping[str, str] = field(default_factory=dict)
    inner: Mapping[str, str] = field(default_factory=dict)
    reads_original: bool = False
    unused: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", MappingProxyType(dict(self.kinds)))
        object.__setattr__(self, "inner", MappingProxyType(dict(self.inner)))
        object.__setattr__(self, "unused", tuple(self.unused))

    @property
    def roles(self) -> tuple[str, ...]:
        """Every frozen model the step reads, by name: the teachers, then ``original`` when it reads it."""
        return (*self.kinds, *((ORIGINAL,) if self.reads_original else ()))

    def names_of_kind(self, kind: str) -> tuple[str, ...]:
        """The teachers of ``kind``, in order."""
        return tuple(name for name, k in self.kinds.items() if k == kind)


def plan_teachers(
    method: type,
    cfg: MethodConfig,
    configured: Mapping[str, str | None] | None = None,
    *,
    exact: bool = False,
) -> TeacherPlan:
    """The one answer to "which teachers?": the :class:`TeacherPlan` of ``method`` for ``cfg``, checked.

    Args:
        method: the method's class; its ``standard_teachers`` (name -> kind, the teachers when none are given),
            ``accepted_kinds``, ``inner_objectives`` and ``reads_original`` are read.
        cfg: the method's config (its name, inner objective, ``inner_teacher`` and ``lambdas`` are read).
        configured: teacher name -> kind, or None for the kind its name implies (:func:`implied_kinds`). None: the
            method's standard teachers.
        exact: the method distils from exactly ``configured`` and a teacher it cannot take is refused (the explicit
            teachers of :func:`mmtard.methods.create_method`); otherwise from those of the kinds it accepts, the
            others :attr:`TeacherPlan.unused` (a run config's teachers, :func:`select_teachers`).

    Raises:
        ConfigError: naming ``teachers.<name>``, ``teachers.<name>.kind``, ``inner``, ``inner_teacher`` or
            ``lambdas.<name>`` and what is expected.
    """
    standard, accepted = method.standard_teachers, method.accepted_kinds
    given = configured
    if configured is not None and not exact:
        given = select_teachers(cfg.name, configured, standard, accepted)
    if cfg.inner not in method.inner_objectives:
        supported = ", ".join(method.inner_objectives)
        raise ConfigError(f"inner: method '{cfg.name}' supports {supported}; got {cfg.inner!r}")
    kinds = resolve_teacher_kinds(cfg.name, given, standard, accepted)
    inner = choose_inner_teachers(cfg.inner, cfg.inner_teacher, kinds)
    if kinds:
        check_lambda_names(tuple(kinds), cfg.lambdas)
    unused = tuple(name for name in configured or {} if name not in kinds)
    return TeacherPlan(cfg.name, kinds, inner, method.reads_original, () if exact else unused)


def metric_suffix(name: str) -> str:
    """The suffix of a teacher's metrics (``L_<suffix>``, ``lambda_<suffix>``, ``shortfall_<suffix>``): ``R`` and
    ``C`` for the standard teachers ``robust`` and ``clean``, the name itself for any other."""
    return STANDARD_SUFFIX.get(name, name)


def implied_kinds(configured: Mapping[str, str | None]) -> dict[str, str]:
    """Every configured teacher, name -> kind, in the given order; a teacher without a kind takes its name's kind
    when it is named ``clean`` or ``robust``.

    Raises:
        ConfigError: ``teachers.<name>.kind: expected clean or robust``.
    """
    kinds = {}
    for name, kind in configured.items():
        if kind is None and name in TEACHER_KINDS:
            kind = name
        if kind not in TEACHER_KINDS:
            got = "" if kind is None else f", got {kind!r}"
            raise ConfigError(f"teachers.{name}.kind: expected {' or '.join(TEACHER_KINDS)}{got}")
        kinds[name] = kind
    return kinds


def select_teachers(
    method: str, configured: Mapping[str, str | None], standard: Mapping[str, str], accepted: tuple[str, ...]
) -> dict[str, str] | None:
    """The configured teachers a method distils from, name -> kind: those of the kinds it accepts, in the given
    order; the method's own order when they are exactly its standard teachers (``clean`` then ``robust``:
    two-teacher runs are those of the method's defaults whatever the YAML's order). None for a method without
    distillation teachers (empty ``accepted``).

    Args:
        method: the method's name, for messages.
        configured: teacher name -> kind, or None for a kind implied by the name (:func:`implied_kinds`).
        standard: the method's teachers when none are given.
        accepted: the kinds the method can distil from.

    Raises:
        ConfigError: a teacher's kind, or no teacher of a kind the method accepts.
    """
    kinds = implied_kinds(configured)
    if not accepted:
        return None
    chosen = {name: kind for name, kind in kinds.items() if kind in accepted}
    if not chosen:
        raise ConfigError(
            f"teachers: method {method} needs teacher(s) {list(standard)}; add teachers.<name>.arch and "
            f".pretrained (and .kind: {' or '.join(accepted)} for names other than {' and '.join(TEACHER_KINDS)})"
        )
    return dict(standard) if chosen == dict(standard) else chosen


def resolve_teacher_kinds(
    method: str,
    given: Mapping[str, str] | None,
    standard: Mapping[str, str],
    accepted: tuple[str, ...],
) -> dict[str, str]:
    """The teachers of a method, name -> kind, checked.

    Args:
        method: the method's name, for messages.
        given: name -> kind from the caller; None for ``standard``.
        standard: the method's teachers when none are given (``{"clean": "clean", "robust": "robust"}``).
        accepted: the kinds the method can distil from; empty for a method without distillation teachers.

    Raises:
        ConfigError: naming ``teachers.<name>.kind`` (or ``teachers.<name>``) and what is expected.
    """
    if given is None:
        return dict(standard)
    if not isinstance(given, Mapping):
        raise ConfigError(f"teachers: expected a mapping teacher name -> kind (clean or robust), got {given!r}")
    given = dict(given)
    if not accepted:
        if given:
            name = next(iter(given))
            raise ConfigError(
                f"teachers.{name}.kind: method '{method}' distils from no clean or robust teacher; expected no "
                f"teachers (a distilling method such as mmt-ard or ard takes them), got {', '.join(given)}"
            )
        return {}
    if not given:
        raise ConfigError(f"teachers: method '{method}' needs at least one robust teacher; got none")
    suffixes: dict[str, str] = {}
    for name, kind in given.items():
        _check_teacher(method, name, kind, accepted)
        suffix = metric_suffix(name)
        if suffix in suffixes:
            raise ConfigError(
                f"teachers.{name}: its metrics (L_{suffix}, lambda_{suffix}) would be those of teacher "
                f"'{suffixes[suffix]}'; give it another name"
            )
        suffixes[suffix] = name
    if "robust" not in given.values():
        name = next(iter(given))
        raise ConfigError(
            f"teachers.{name}.kind: method '{method}' needs at least one teacher of kind robust; got only "
            f"{', '.join(f'{n} ({k})' for n, k in given.items())}"
        )
    return given


def _check_teacher(method: str, name: object, kind: object, accepted: tuple[str, ...]) -> None:
    """One teacher's name and kind."""
    if not isinstance(name, str) or not TEACHER_NAME.fullmatch(name):
        raise ConfigError(
            f"teachers.{name}: expected a name of a letter then letters, digits, '_' or '-' (it names "
            "metrics, config fields and cache folders)"
        )
    if hasattr(nn.ModuleDict, name):
        raise ConfigError(
            f"teachers.{name}: the name is an attribute of the method's teacher mapping (torch's nn.ModuleDict, "
            "which holds the teachers by name); give this teacher another name"
        )
    if name in RESERVED_TEACHER_NAMES:
        raise ConfigError(
            f"teachers.{name}: the name is reserved for the frozen copy of the starting student (fare, pmg-aft); "
            "give this teacher another name"
        )
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"teachers.{name}.kind: expected one of {', '.join(TEACHER_KINDS)}; got {kind!r}")
    if name in TEACHER_KINDS and kind != name:
        raise ConfigError(
            f"teachers.{name}.kind: the teacher named '{name}' is the {name} teacher (its metrics are "
            f"L_{STANDARD_SUFFIX[name]}...); expected {name}, or give a {kind} teacher another name"
        )
    if kind not in accepted:
        raise ConfigError(
            f"teachers.{name}.kind: method '{method}' distils from {' or '.join(accepted)} teachers only; got "
            f"{kind} (mmt-ard takes clean and robust teachers)"
        )


def choose_inner_teachers(inner: str, inner_teacher: str | None, teacher_kinds: Mapping[str, str]) -> dict[str, str]:
    """Kind -> the teacher whose clean-image logits the ``kl-*`` inner objective uses (empty for other objectives).

    ``inner_teacher`` names it; by default the first teacher of the objective's kind, in the teachers' order.

    Raises:
        ConfigError: ``inner_teacher`` set for an objective without teacher, or not a teacher of the right kind;
            no teacher of the objective's kind.
    """
    kind = INNER_TEACHER_KIND.get(inner)
    if kind is None:
        if inner_teacher is not None:
            raise ConfigError(
                f"inner_teacher: the '{inner}' inner objective uses no teacher; expected null, got {inner_teacher!r}"
            )
        return {}
    names = [name for name, k in teacher_kinds.items() if k == kind]
    if inner_teacher is not None:
        if inner_teacher not in names:
            raise ConfigError(
                f"inner_teacher: expected the name of a {kind} teacher ({', '.join(names) or 'there is none'}) for "
                f"inner '{inner}', got {inner_teacher!r}"
            )
        return {kind: inner_teacher}
    if not names:
        raise ConfigError(
            f"inner: '{inner}' needs a teacher of kind {kind}; the teachers are "
            f"{', '.join(f'{n} ({k})' for n, k in teacher_kinds.items())}"
        )
    return {kind: names[0]}


def fixed_weights(
    names: tuple[str, ...], lambda_robust: float, lambda_clean: float, lambdas: Mapping[str, float] | None
) -> dict[str, float]:
    """The ``fixed`` balance's weight per teacher: ``lambda_robust``, ``lambda_clean`` for the standard teachers,
    ``lambdas[name]`` (default 1) for the others.

    Raises:
        ConfigError: ``lambdas`` names no teacher of ``names``.
    """
    lambdas = dict(lambdas or {})
    check_lambda_names(names, lambdas)
    standard = {"robust": lambda_robust, "clean": lambda_clean}
    return {name: standard[name] if name in standard else lambdas.get(name, 1.0) for name in names}


def check_lambda_names(names: tuple[str, ...], lambdas: Mapping[str, float] | None) -> None:
    """Every name of ``lambdas`` is one of the teachers ``names``.

    Raises:
        ConfigError: ``lambdas.<name>: no teacher of that name``.
    """
    unknown = [name for name in lambdas or {} if name not in names]
    if unknown:
        raise ConfigError(
            f"lambdas.{unknown[0]}: no teacher of that name; expected some of "
            f"{', '.join(n for n in names if n not in STANDARD_LAMBDA_FIELDS) or 'no name'}"
        )
