"""Sanity checks before a robust accuracy is trusted (as AutoAttack's own checks, Croce & Hein 2020, and
Carlini et al., "On Evaluating Adversarial Robustness", 2019).

Signs of gradient masking or a broken attack:

- robust accuracy above clean accuracy (the attack made the model *more* accurate);
- robust accuracy that rises as eps grows (a larger ball contains the smaller one);
- a stronger attack that finds fewer errors than a weaker one at the same eps
  (strength order ``pgd < apgd-ce < apgd-t < aa < autoattack``);
- samples whose input gradient is exactly zero (gradient-based attacks cannot move them).

Accuracies of one evaluation come from the same samples, so they are compared exactly (``TOLERANCE = 0``):
one more robust sample is already a failed check. Accuracies are percentages.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.attacks.base import frozen_parameters
from mmtard.errors import ConfigError
from mmtard.units import format_eps

#: weakest first; ``aa`` contains APGD-CE and APGD-T, ``autoattack`` contains ``aa``'s attacks and more
ATTACK_STRENGTH_ORDER = ("pgd", "apgd-ce", "apgd-t", "aa", "autoattack")
#: allowed excess in percentage points before a comparison fails; 0 means exact comparison
TOLERANCE = 0.0
DEFAULT_ZERO_GRAD_WARN = 0.1
_RESULT_KEYS = ("attack", "eps_value", "acc")


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of samples whose cross-entropy gradient w.r.t. the input is exactly zero everywhere.

    Args:
        model: maps ``(B, C, H, W)`` pixels in ``[0, 1]`` to ``(B, K)`` logits, in eval mode (samples must
            not interact, so the per-sample gradient is the gradient of the summed loss).
        x: images ``(B, C, H, W)``.
        y: labels ``(B,)``.

    Returns:
        A fraction in ``[0, 1]``; 1.0 for a model whose output does not depend on the input. Parameter
        ``.grad`` is left untouched.
    """
    if x.shape[0] == 0:
        raise ConfigError("zero_gradient_fraction: x holds no samples")
    x = x.detach().clone().requires_grad_(True)
    with frozen_parameters(model), torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y.to(x.device), reduction="sum")
        if not loss.requires_grad:  # the output does not depend on x at all
            return 1.0
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        return 1.0
    zero = grad.flatten(1).abs().amax(dim=1) == 0
    return zero.float().mean().item()


def check_robust_results(
    clean_acc: float,
    robust: Sequence[dict[str, Any]],
    zero_grad_fraction: float | None = None,
    zero_grad_warn: float = DEFAULT_ZERO_GRAD_WARN,
) -> dict[str, Any]:
    """Check the robust accuracies of one model on one set of samples for signs of gradient masking.

    Args:
        clean_acc: clean accuracy in percent.
        robust: one entry per (attack, eps) with keys ``attack`` (registry name), ``eps_value`` (float)
            and ``acc`` (robust accuracy in percent); further keys are ignored.
        zero_grad_fraction: from ``zero_gradient_fraction``, or ``None`` when not measured.
        zero_grad_warn: a zero-gradient share above this adds a warning.

    Returns:
        ``robust_not_above_clean`` (bool), ``monotonic_in_eps`` (bool: per attack, accuracy never rises as
        eps grows), ``stronger_attack_not_weaker`` (bool, or ``None`` when no eps has two attacks of the
        strength order), ``zero_gradient_fraction`` (the value given) and ``warnings`` (one string per
        failed check).

    Raises:
        ConfigError: an entry lacks a key, or two entries share attack and eps.
    """
    results = _index_results(robust)
    not_above_clean, above_clean_warnings = _robust_not_above_clean(results, clean_acc)
    monotonic, monotonic_warnings = _monotonic_in_eps(results)
    stronger_not_weaker, strength_warnings = _stronger_attack_not_weaker(results)
    warnings = [*above_clean_warnings, *monotonic_warnings, *strength_warnings]
    if zero_grad_fraction is not None and zero_grad_fraction > zero_grad_warn:
        warnings.append(
            f"{zero_grad_fraction:.1%} of samples have an exactly zero input gradient (warning above "
            f"{zero_grad_warn:.1%}): gradient-based attacks cannot move them; possible gradient masking"
        )
    return {
        "robust_not_above_clean": not_above_clean,
        "monotonic_in_eps": monotonic,
        "stronger_attack_not_weaker": stronger_not_weaker,
        "zero_gradient_fraction": zero_grad_fraction,
        "warnings": warnings,
    }


def _robust_not_above_clean(results: dict[tuple[str, float], float], clean_acc: float) -> tuple[bool, list[str]]:
    """No robust accuracy above the clean one (within :data:`TOLERANCE`), and a warning for each that is."""
    warnings = [
        f"robust accuracy above clean accuracy for {attack} at {format_eps(eps)} "
        f"({acc:.1f}% > {clean_acc:.1f}%): the attack is broken or the evaluations used different samples"
        for (attack, eps), acc in results.items()
        if acc > clean_acc + TOLERANCE
    ]
    return not warnings, warnings


def _monotonic_in_eps(results: dict[tuple[str, float], float]) -> tuple[bool, list[str]]:
    """Per attack, accuracy never rises as eps grows (within :data:`TOLERANCE`); a warning for each rise."""
    by_attack: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (attack, eps), acc in results.items():
        by_attack[attack].append((eps, acc))
    warnings = []
    for attack, points in by_attack.items():
        for (eps_a, acc_a), (eps_b, acc_b) in itertools.pairwise(sorted(points)):
            if acc_b > acc_a + TOLERANCE:
                warnings.append(
                    f"robust accuracy rises with eps for {attack}: {format_eps(eps_a)} -> {format_eps(eps_b)} "
                    f"({acc_a:.1f}% -> {acc_b:.1f}%): possible gradient masking"
                )
    return not warnings, warnings


def _stronger_attack_not_weaker(results: dict[tuple[str, float], float]) -> tuple[bool | None, list[str]]:
    """At each eps, an attack later in :data:`ATTACK_STRENGTH_ORDER` finds no higher accuracy than an earlier one
    (None when no eps has two such attacks); a warning for each pair where it does."""
    by_eps: dict[float, dict[str, float]] = defaultdict(dict)
    for (attack, eps), acc in results.items():
        if attack in ATTACK_STRENGTH_ORDER:
            by_eps[eps][attack] = acc
    compared, warnings = False, []
    for eps in sorted(by_eps):
        ranked = sorted(by_eps[eps].items(), key=lambda item: ATTACK_STRENGTH_ORDER.index(item[0]))
        for (weaker, acc_weak), (stronger, acc_strong) in itertools.combinations(ranked, 2):
            compared = True
            if acc_strong > acc_weak + TOLERANCE:
                warnings.append(
                    f"{stronger} is weaker than {weaker} at {format_eps(eps)} "
                    f"({acc_strong:.1f}% > {acc_weak:.1f}% robust accuracy): possible gradient masking or a "
                    "broken attack"
                )
    return (not warnings if compared else None), warnings


def _index_results(robust: Sequence[dict[str, Any]]) -> dict[tuple[str, float], float]:
    results: dict[tuple[str, float], float] = {}
    for i, entry in enumerate(robust):
        missing = [key for key in _RESULT_KEYS if key not in entry]
        if missing:
            raise ConfigError(f"robust[{i}]: missing {', '.join(missing)}; expected keys {', '.join(_RESULT_KEYS)}")
        key = (str(entry["attack"]), float(entry["eps_value"]))
        if key in results:
            raise ConfigError(
                f"robust[{i}]: a second result for {key[0]} at {format_eps(key[1])}; pass the results of one "
                "model on one set of samples"
            )
        results[key] = float(entry["acc"])
    return results
