"""The method registry: ``@register_method(name)``, ``create_method(cfg)``, ``list_methods()``."""

from __future__ import annotations

from collections.abc import Callable

from mmtard.errors import ConfigError
from mmtard.methods.base import Method
from mmtard.methods.config import MethodConfig, method_config

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``name`` create this method. One class may serve several names (presets)."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"register_method: '{name}' is already registered to {_METHODS[name].__name__}")
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(_METHODS)


def create_method(cfg: MethodConfig | str) -> Method:
    """Build the method named by ``cfg.name`` (a string is read as a preset with its defaults).

    Raises:
        ConfigError: unknown name (the message lists the known ones) or an invalid config.
    """
    if isinstance(cfg, str):
        if cfg not in _METHODS:
            raise ConfigError(f"method: unknown method '{cfg}'; expected one of {', '.join(list_methods())}")
        cfg = method_config(cfg)
    if cfg.name not in _METHODS:
        raise ConfigError(f"name: unknown method '{cfg.name}'; expected one of {', '.join(list_methods())}")
    return _METHODS[cfg.name](cfg)
