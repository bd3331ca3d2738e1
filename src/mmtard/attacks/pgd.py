"""``"pgd"``: cross-entropy PGD (Madry et al., ICLR 2018) on a classifier, L-inf or L2.

Defaults: 10 steps of size ``alpha = eps / 4``, one run from a uniform random start. The random start is
drawn from a ``torch.Generator`` seeded with ``seed`` on the input's device, so the same seed gives the
same ``x_adv`` and the global RNG is not touched. Given ``sample_ids`` (evaluation passes each image's dataset
position), each sample's start comes from its own generator seeded with ``(seed, id)``, so its ``x_adv`` is the
same in any batch, whatever the batch size. With ``restarts > 1`` a sample that any restart
misclassifies keeps that restart's point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.attacks.base import Attack
from mmtard.attacks.functional import pgd
from mmtard.attacks.registry import register_attack

DEFAULT_ALPHA_FRACTION = 0.25  # alpha = eps / 4
SAMPLE_SEED_STRIDE = 1_000_003  # a prime: (seed, id) pairs map to distinct generator seeds for ids below it


def sample_generator(seed: int, sample_id: int, device: torch.device) -> torch.Generator:
    """The generator of one sample's random start: seeded from ``(seed, sample_id)``."""
    return torch.Generator(device=device).manual_seed(seed * SAMPLE_SEED_STRIDE + sample_id)


@register_attack("pgd")
class PGDAttack(Attack):
    """Cross-entropy PGD in ``[0, 1]`` pixel space; see ``mmtard.attacks.functional.pgd`` for the steps."""

    default_steps = 10
    default_restarts = 1
    uses_alpha = True
    per_sample_randomness = True

    @property
    def step_size(self) -> float:
        """``alpha`` as given, else ``eps / 4``."""
        return self.alpha if self.alpha is not None else self.eps * DEFAULT_ALPHA_FRACTION

    def _perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x_adv).float(), y, reduction="none")

        def misclassified(x_adv: torch.Tensor) -> torch.Tensor:
            return model(x_adv).argmax(dim=1) != y

        if sample_ids is None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        else:
            generator = [sample_generator(self.seed, int(i), x.device) for i in sample_ids.tolist()]
        return pgd(
            loss_fn,
            x,
            eps=self.eps,
            alpha=self.step_size,
            steps=self.steps,
            norm=self.norm,
            random_init=True,
            restarts=self.restarts,
            success_fn=misclassified if self.restarts > 1 else None,
            generator=generator,
        )
