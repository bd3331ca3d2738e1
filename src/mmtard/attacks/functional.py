"""The PGD engine: projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018) in ``[0, 1]`` pixel space, for any per-sample loss.

Functions, not attacks: the registered ``"pgd"`` attack (``mmtard.attacks.pgd``) and the training methods'
inner maximisation both call :func:`pgd` with their own loss.

L-inf: sign-gradient step, projection onto the eps-box. L2: normalised-gradient step, projection onto the
eps-ball. After every step the image is clipped to ``[0, 1]``. Shapes: ``x`` is ``(B, C, H, W)``;
``loss_fn(x_adv)`` returns the ``(B,)`` per-sample losses to maximise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmtard.attacks.base import check_norm
from mmtard.errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the L-inf box or the L2 ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """A uniform random perturbation in the eps-box (L-inf) or eps-ball (L2), kept inside ``[0, 1]``.

    ``generator`` may be one generator per sample: each sample's start then depends on its own generator
    only, not on the batch it is in (evaluation results do not change with the batch size).
    """
    if isinstance(generator, Sequence):
        return torch.cat([random_start(x[i : i + 1], eps, norm, g) for i, g in enumerate(generator)])
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = direction * radius * eps
    return (x + delta).clamp(0, 1) - x


def ascend(
    loss_fn: LossFn, x: torch.Tensor, delta: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str
) -> torch.Tensor:
    """``steps`` projected gradient-ascent steps of ``loss_fn`` from ``x + delta``: a signed step of ``alpha``
    (``linf``) or one of length ``alpha`` along the gradient (``l2``), projected onto the eps-ball and ``[0, 1]``.
    Returns the detached ``x_adv``."""
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            if norm == "linf":
                step = alpha * grad.sign()
            else:
                step = alpha * grad / _flat_norm(grad).clamp_min(1e-12)
            delta = project(delta + step, eps, norm)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def pgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_init: bool = True,
    restarts: int = 1,
    success_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Maximise ``loss_fn`` within the eps-ball around ``x`` and ``[0, 1]``.

    Args:
        loss_fn: maps ``x_adv`` ``(B, C, H, W)`` to per-sample losses ``(B,)``.
        x: clean images in ``[0, 1]``.
        eps: radius (a fraction of the pixel range, e.g. ``4/255``).
        alpha: step size (same units).
        steps: gradient steps per restart.
        norm: ``"linf"`` or ``"l2"``.
        random_init: start from a uniform random point (else from ``x``).
        restarts: independent runs; per sample the one that succeeds (``success_fn``) or, failing that,
            reaches the highest final loss is kept.
        success_fn: maps ``x_adv`` to a ``(B,)`` bool tensor, True where the attack has succeeded
            (e.g. misclassified). A success is never replaced by a later restart.
        generator: RNG for the random start, for reproducible attacks; or one per sample.

    Returns:
        ``x_adv`` with ``||x_adv - x|| <= eps`` and values in ``[0, 1]``, detached.
    """
    check_norm(norm)
    if eps < 0 or alpha <= 0 or steps < 0 or restarts < 1:
        raise ConfigError(
            f"pgd: need eps >= 0, alpha > 0, steps >= 0, restarts >= 1 (got {eps}, {alpha}, {steps}, {restarts})"
        )
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = random_start(x, eps, norm, generator) if random_init and eps > 0 else torch.zeros_like(x)
        x_adv = ascend(loss_fn, x, delta, eps=eps, alpha=alpha, steps=steps, norm=norm)
        if restarts == 1 and success_fn is None:
            return x_adv  # nothing to choose between: skip the extra forward pass
        with torch.no_grad():
            final_loss = loss_fn(x_adv).detach().float()
            success = success_fn(x_adv) if success_fn is not None else torch.zeros_like(best_success)
            better = (success & ~best_success) | ((success == best_success) & (final_loss > best_loss))
            best[better] = x_adv[better]
            best_loss = torch.where(better, final_loss, best_loss)
            best_success |= success
    return best.detach()
