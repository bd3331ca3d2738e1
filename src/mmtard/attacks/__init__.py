"""Attacks in ``[0, 1]`` pixel space: PGD, APGD adapters, the ``aa`` ensemble, AutoAttack, and
gradient-masking checks. ``create_attack(name, eps=...)`` builds any registered attack.

Modules: ``base`` (the ``Attack`` class, ``NORMS``), ``functional`` (the PGD engine any loss can use),
``pgd`` / ``apgd`` / ``ensemble`` (the registered attacks), ``registry``, ``checks``.
"""

from mmtard.attacks import apgd, ensemble, pgd  # noqa: F401  (fill the registry)
from mmtard.attacks.base import NORMS, Attack
from mmtard.attacks.checks import check_robust_results, zero_gradient_fraction
from mmtard.attacks.registry import create_attack, list_attacks, register_attack

__all__ = [
    "NORMS",
    "Attack",
    "check_robust_results",
    "create_attack",
    "list_attacks",
    "register_attack",
    "zero_gradient_fraction",
]
