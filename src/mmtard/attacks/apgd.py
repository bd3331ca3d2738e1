"""APGD adapters (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020) over the ``pyautoattack`` implementation, L-inf or L2.

``"apgd-ce"``: APGD on the cross-entropy loss. ``"apgd-t"``: targeted APGD on the DLR loss, run against the
``min(9, K - 1)`` classes the model ranks highest after the true one (``K`` read from the model output;
the targeted DLR loss needs ``K >= 4``). Both default to 100 iterations and one restart and adapt their step
size, so ``alpha`` is not taken.

pyautoattack attacks only the points the model classifies correctly and returns the clean image for the
others and for points it cannot fool. It reseeds the global torch RNG with the attack's seed; every call here
runs inside ``isolated_rng`` so the caller's random stream is unchanged, and the same seed gives the same
``x_adv``.
"""

from __future__ import annotations

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from torch import nn

from mmtard.attacks.base import Attack, isolated_rng, num_classes
from mmtard.attacks.registry import register_attack
from mmtard.errors import ConfigError

#: our norm names -> pyautoattack's
PYAUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}
MAX_TARGET_CLASSES = 9
MIN_CLASSES_TARGETED = 4  # the targeted DLR loss reads the 1st, 3rd and 4th largest logits


def check_targeted_classes(n_classes: int, attack: str) -> int:
    """Number of target classes for a targeted DLR attack on ``n_classes`` classes, ``min(9, K - 1)``.

    Raises:
        ConfigError: fewer than 4 classes.
    """
    if n_classes < MIN_CLASSES_TARGETED:
        raise ConfigError(
            f"{attack}: the targeted DLR loss needs at least {MIN_CLASSES_TARGETED} classes, the model has "
            f"{n_classes}; use apgd-ce or pgd"
        )
    return min(MAX_TARGET_CLASSES, n_classes - 1)


@register_attack("apgd-ce")
class APGDCE(Attack):
    """Untargeted APGD on the cross-entropy loss."""

    default_steps = 100
    default_restarts = 1

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack = APGDAttack(
            model,
            n_iter=self.steps,
            norm=PYAUTOATTACK_NORMS[self.norm],
            n_restarts=self.restarts,
            eps=self.eps,
            seed=self.seed,
            loss="ce",
            verbose=False,
            device=x.device,
        )
        with isolated_rng(x.device):
            return attack.perturb(x, y)


@register_attack("apgd-t")
class APGDT(Attack):
    """Targeted APGD on the DLR loss against the ``min(9, K - 1)`` most likely wrong classes."""

    default_steps = 100
    default_restarts = 1

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n_targets = check_targeted_classes(num_classes(model, x), self.name)
        attack = APGDAttack_targeted(
            model,
            n_iter=self.steps,
            norm=PYAUTOATTACK_NORMS[self.norm],
            n_restarts=self.restarts,
            eps=self.eps,
            seed=self.seed,
            n_target_classes=n_targets,
            verbose=False,
            device=x.device,
        )
        with isolated_rng(x.device):
            return attack.perturb(x, y)
