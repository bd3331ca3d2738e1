"""Attack ensembles: a sample counts as robust only if every attack of the ensemble fails on it.

``"aa"``: APGD-CE, then APGD-T on the points APGD-CE did not fool (the RobustVLM / MMT-ARD evaluation
protocol; 100 iterations each by default, ``steps`` sets both, ``restarts`` both). With fewer than 4 classes
the targeted DLR loss is undefined: APGD-CE runs alone and a warning is logged.

``"autoattack"``: pyautoattack's standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein,
ICML 2020), its settings fixed by the protocol. With fewer than 10 classes the targeted attacks use
``K - 1`` target classes instead of 9 (the standard count is impossible there); it needs ``K >= 4``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
from pyautoattack import AutoAttack
from torch import nn

from mmtard.attacks.apgd import APGDCE, APGDT, MIN_CLASSES_TARGETED, PYAUTOATTACK_NORMS, check_targeted_classes
from mmtard.attacks.base import Attack, isolated_rng, num_classes
from mmtard.attacks.registry import register_attack

logger = logging.getLogger(__name__)


@register_attack("aa")
class APGDEnsemble(Attack):
    """APGD-CE followed by APGD-T on the survivors."""

    default_steps = 100
    default_restarts = 1

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        settings = dict(eps=self.eps, norm=self.norm, steps=self.steps, restarts=self.restarts, seed=self.seed)
        x_adv = APGDCE(**settings)(model, x, y).clone()
        n_classes = num_classes(model, x)
        if n_classes < MIN_CLASSES_TARGETED:
            logger.warning(
                "aa: the model has %d classes, fewer than the %d the targeted DLR loss needs; APGD-T was "
                "skipped and the result is APGD-CE alone",
                n_classes,
                MIN_CLASSES_TARGETED,
            )
            return x_adv
        with torch.no_grad():
            robust = model(x_adv).argmax(dim=1) == y
        if robust.any():
            x_adv[robust] = APGDT(**settings)(model, x[robust], y[robust])
        return x_adv


@register_attack("autoattack")
class StandardAutoAttack(Attack):
    """pyautoattack's ``AutoAttack(version="standard")``; ``steps`` and ``restarts`` are its own."""

    default_steps = 100
    default_restarts = 1
    fixed_settings = True

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n_targets = check_targeted_classes(num_classes(model, x), self.name)
        adversary = AutoAttack(
            model, norm=PYAUTOATTACK_NORMS[self.norm], eps=self.eps, version="standard", seed=self.seed, device=x.device
        )
        adversary.verbose = False
        adversary.apgd_targeted.n_target_classes = n_targets
        adversary.fab.n_target_classes = n_targets
        with isolated_rng(x.device), _restored_trace():
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        return x_adv


@contextlib.contextmanager
def _restored_trace() -> Iterator[None]:
    """AutoAttack's dynamic-defense check ends with ``sys.settrace(None)``, which would switch off a
    coverage tool or debugger; put the caller's trace function back."""
    trace = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(trace)
