"""The attack registry: ``@register_attack(name)``, ``create_attack(name, ...)``, ``list_attacks()``.

Adding an attack means adding one module with a registered ``Attack`` subclass and importing it in
``mmtard.attacks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mmtard.attacks.base import Attack
from mmtard.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
AttackClass = TypeVar("AttackClass", bound=type[Attack])


def register_attack(name: str) -> Callable[[AttackClass], AttackClass]:
    """Class decorator that registers an ``Attack`` subclass under ``name`` and sets its ``name``.

    Raises:
        TypeError: the decorated object is not an ``Attack`` subclass.
        ValueError: ``name`` is already registered to another class.
    """

    def decorator(cls: AttackClass) -> AttackClass:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise TypeError(f"register_attack('{name}'): {cls!r} is not an Attack subclass")
        ATTACKS.add(name, cls)
        cls.name = name
        return cls

    return decorator


def list_attacks() -> list[str]:
    """Names of every registered attack, sorted."""
    return ATTACKS.names()


def create_attack(
    name: str,
    *,
    eps: float | str,
    norm: str = "linf",
    steps: int | None = None,
    restarts: int | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> Attack:
    """Build a registered attack.

    Args:
        name: a name from ``list_attacks()``.
        eps: radius in ``[0, 1]`` pixel units (``4/255``, or the string ``"4/255"``); at most 1 for ``linf``,
            any finite value ``>= 0`` for ``l2``.
        norm: ``"linf"`` or ``"l2"``.
        steps: iterations; ``None`` for the attack's default.
        restarts: random restarts; ``None`` for the attack's default.
        alpha: step size for fixed-step attacks (``pgd``); ``None`` for the default.
        seed: seed of the attack's randomness.

    Raises:
        ConfigError: unknown name, an unreadable, NaN, infinite or negative eps (or above 1 for ``linf``),
            or a setting the attack does not take.
    """
    attack_class = ATTACKS.get(name)
    return attack_class(eps=eps, norm=norm, steps=steps, restarts=restarts, alpha=alpha, seed=seed)
