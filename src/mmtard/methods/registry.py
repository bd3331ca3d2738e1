"""The method registry: ``@register_method(name, **preset)``, ``method_config``, ``create_method``, ``list_methods``,
and ``method_class`` (the class whose attributes :func:`mmtard.methods.teachers.plan_teachers` reads).

A preset (spec section 3) is a name plus overrides of :class:`MethodConfig`'s defaults, registered on the class
that computes it; one class may serve several presets (``mmt-ard``, ``mmt-ard-adv`` and ``reference``). A preset's
name belongs to its objective: ``objective`` lists the values a field may take under that name, so a setting that
drops a part of the method (``clean_input: adversarial`` under ``mmt-ard``) is refused with the name to use instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from mmtard.errors import ConfigError
from mmtard.methods.base import Method
from mmtard.methods.config import MethodConfig
from mmtard.methods.teachers import TeacherPlan
from mmtard.registry import Registry


@dataclass(frozen=True)
class Preset:
    """A registered method name: its class and its overrides of the config defaults."""

    method: type[Method]
    overrides: Mapping[str, object]
    objective: Mapping[str, tuple] = field(default_factory=dict)  # field -> the values that keep this name's objective


METHODS: Registry[Preset] = Registry("name", kind="method")


def register_method(
    name: str, objective: Mapping[str, tuple] | None = None, **overrides: object
) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``name`` create this method with ``overrides`` of the :class:`MethodConfig` defaults.

    Args:
        name: the preset's name.
        objective: field -> the values it may take under this name (the parts of the objective the name stands
            for); :func:`method_config` refuses any other value.
        overrides: the preset's values of :class:`MethodConfig` fields.

    Raises:
        ValueError: ``name`` is taken, or an override or objective key is not a config field (programming errors).
    """
    objective = dict(objective or {})
    unknown = (set(overrides) | set(objective)) - {f.name for f in fields(MethodConfig)}
    if unknown:
        raise ValueError(f"register_method('{name}'): {sorted(unknown)} are not MethodConfig fields")

    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.add(name, Preset(cls, MappingProxyType(dict(overrides)), MappingProxyType(objective)))
        return cls

    return decorator


def list_methods() -> list[str]:
    """Every registered method name, sorted."""
    return METHODS.names()


def presets() -> dict[str, dict[str, object]]:
    """Each method name's overrides of the config defaults."""
    return {name: dict(preset.overrides) for name, preset in METHODS.items()}


def method_config(preset: str, **overrides: object) -> MethodConfig:
    """The validated config of ``preset`` with ``overrides`` applied on top of the preset's own.

    Raises:
        ConfigError: unknown preset, unknown field, an invalid value, or a value that leaves the preset's objective
            (the message names the presets whose objective has it).
    """
    known = {f.name for f in fields(MethodConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"method: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    entry = METHODS.get(preset)
    cfg = MethodConfig(**{**entry.overrides, **overrides, "name": preset}).validate()
    for key, allowed in entry.objective.items():
        value = getattr(cfg, key)
        if value not in allowed:
            elsewhere = [n for n, p in METHODS.items() if value in p.objective.get(key, ())]
            instead = f"; that objective is the preset {' or '.join(elsewhere)}" if elsewhere else ""
            raise ConfigError(
                f"{key}: the '{preset}' preset keeps {key} in {list(allowed)} (its objective), got {value!r}{instead}"
            )
    return cfg


def create_method(cfg: MethodConfig | str, teachers: TeacherPlan | Mapping[str, str] | None = None) -> Method:
    """Build the method named by ``cfg.name`` (a string is read as a preset with its defaults).

    Args:
        cfg: the method's config, or a preset name.
        teachers: the method's :class:`TeacherPlan` (:func:`mmtard.methods.teachers.plan_teachers`), or teacher
            name -> kind (``clean`` or ``robust``) in the order the terms are computed and logged, exactly the
            teachers it distils from. None: the preset's standard teachers (``clean`` and ``robust`` for
            ``mmt-ard``, ``mmt-ard-adv``, ``reference``, ``robust`` for ``ard``, none for the others).
            ``mmt-ard``/``reference`` take any number of clean and robust teachers with at least one robust; ``ard``
            robust teachers only; ``tecoa``, ``fare``, ``pmg-aft`` and ``clean-ft`` none (an empty mapping or None).

    Raises:
        ConfigError: unknown name (the message lists the known ones), an invalid config, or teachers the method
            cannot take (naming ``teachers.<name>.kind`` and what is expected).
    """
    if isinstance(cfg, str):
        cfg = method_config(cfg)
    return METHODS.get(cfg.name).method(cfg, teachers)


def method_class(name: str) -> type[Method]:
    """The class that computes method ``name``: its class attributes answer the static questions (which teachers
    it accepts) that :func:`mmtard.methods.teachers.plan_teachers` reads, without building an instance.

    Raises:
        ConfigError: unknown method name.
    """
    return METHODS.get(name).method
