"""The method registry: ``@register_method(name, **preset)``, ``method_config``, ``create_method``, ``list_methods``,
``standard_teacher_kinds``.

A preset (spec section 3) is a name plus overrides of :class:`MethodConfig`'s defaults, registered on the class
that computes it; one class may serve several presets (``mmt-ard`` and ``reference``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from mmtard.errors import ConfigError
from mmtard.methods.base import Method
from mmtard.methods.config import MethodConfig
from mmtard.registry import Registry


@dataclass(frozen=True)
class Preset:
    """A registered method name: its class and its overrides of the config defaults."""

    method: type[Method]
    overrides: Mapping[str, object]


METHODS: Registry[Preset] = Registry("name", kind="method")


def register_method(name: str, **overrides: object) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``name`` create this method with ``overrides`` of the :class:`MethodConfig` defaults.

    Raises:
        ValueError: ``name`` is taken, or an override is not a config field (programming errors).
    """
    unknown = set(overrides) - {f.name for f in fields(MethodConfig)}
    if unknown:
        raise ValueError(f"register_method('{name}'): {sorted(unknown)} are not MethodConfig fields")

    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.add(name, Preset(cls, MappingProxyType(dict(overrides))))
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
        ConfigError: unknown preset, unknown field, or an invalid value.
    """
    known = {f.name for f in fields(MethodConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"method: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    values = {**METHODS.get(preset).overrides, **overrides, "name": preset}
    return MethodConfig(**values).validate()


def create_method(cfg: MethodConfig | str, teacher_kinds: Mapping[str, str] | None = None) -> Method:
    """Build the method named by ``cfg.name`` (a string is read as a preset with its defaults).

    Args:
        cfg: the method's config, or a preset name.
        teacher_kinds: teacher name -> kind (``clean`` or ``robust``), in the order the terms are computed and
            logged; the method's ``teacher_roles`` are then these names. None: the preset's standard teachers
            (:func:`standard_teacher_kinds`: ``clean`` and ``robust`` for ``mmt-ard`` and ``reference``,
            ``robust`` for ``ard``, none for the others). ``mmt-ard``/``reference`` take any number of clean and
            robust teachers with at least one robust; ``ard`` robust teachers only; ``tecoa``, ``fare``,
            ``pmg-aft`` and ``clean-ft`` none (an empty mapping or None).

    Raises:
        ConfigError: unknown name (the message lists the known ones), an invalid config, or teachers the method
            cannot take (naming ``teachers.<name>.kind`` and what is expected).
    """
    if isinstance(cfg, str):
        cfg = method_config(cfg)
    return METHODS.get(cfg.name).method(cfg, teacher_kinds)


def standard_teacher_kinds(name: str) -> dict[str, str]:
    """The teachers (name -> kind) that method ``name`` uses when none are given: ``{"clean": "clean",
    "robust": "robust"}`` for ``mmt-ard`` and ``reference``, ``{"robust": "robust"}`` for ``ard``, ``{}`` else.

    Raises:
        ConfigError: unknown method name.
    """
    return dict(METHODS.get(name).method.standard_teachers)
