"""Attacks in ``[0, 1]`` pixel space: PGD, APGD adapters, the ``aa`` ensemble, AutoAttack, and
gradient-masking checks. ``create_attack(name, eps=...)`` builds any registered attack."""

from mmtard.attacks import apgd, ensemble, pgd_attack  # noqa: F401  (fill the registry)
from mmtard.attacks.base import Attack
from mmtard.attacks.checks import check_robust_results, zero_gradient_fraction
from mmtard.attacks.pgd import pgd
from mmtard.attacks.registry import create_attack, list_attacks, register_attack

__all__ = [
    "Attack",
    "check_robust_results",
    "create_attack",
    "list_attacks",
    "pgd",
    "register_attack",
    "zero_gradient_fraction",
]
