"""The ``Attack`` base class: one object per configured attack, called as ``attack(model, x, y) -> x_adv``.

Units and shapes: ``x`` is ``(B, C, H, W)`` in ``[0, 1]`` pixel space, ``y`` is ``(B,)`` class indices, the
model maps pixels to ``(B, K)`` logits (normalisation lives inside the model). ``eps`` is in ``[0, 1]`` pixel
units (``4/255``), read by ``mmtard.units.parse_eps`` and never rescaled: at most 1 for ``linf``, any finite
length for ``l2``.

Contract of every attack: the returned ``x_adv`` is detached, has the shape of ``x``, satisfies
``||x_adv - x|| <= eps`` in the attack's norm (up to float rounding) and lies in ``[0, 1]``. The model's
parameters are left as they were: no ``.grad`` is set and ``requires_grad`` is restored. The caller puts the
model in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from mmtard.errors import ConfigError
from mmtard.units import NORMS, format_eps, parse_eps
from mmtard.validate import check_whole_number

__all__ = ["NORMS", "Attack", "check_norm", "frozen_parameters", "isolated_rng", "num_classes"]


def check_norm(norm: str) -> str:
    """``norm`` itself if it is one of ``NORMS``: ``"linf"`` (per-pixel box) or ``"l2"`` (whole-image ball).

    Raises:
        ConfigError: any other value.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm: expected one of {NORMS}, got {norm!r}")
    return norm


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on the model's parameters for the duration of an attack.

    Gradients then flow to the input only: no parameter ``.grad`` is written (FAB in AutoAttack calls
    ``backward()``) and no weight gradients are computed, which also makes attacks faster. The flags are
    restored on exit, also after an exception.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextlib.contextmanager
def isolated_rng(device: torch.device) -> Iterator[None]:
    """Run code that reseeds the global torch RNG (pyautoattack calls ``torch.random.manual_seed``)
    without changing the caller's random stream: the CPU state, and the CUDA state of ``device`` when it
    is a GPU, are saved and restored."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """``K``, read from the model's output on one sample."""
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


class Attack:
    """Base class of all attacks. Subclasses set the class attributes and implement ``_perturb``.

    Args:
        eps: radius in ``[0, 1]`` pixel units (a float or a string such as ``"4/255"``): at most 1 for
            ``linf``, any finite value ``>= 0`` for ``l2`` (the length of the whole image's perturbation).
        norm: ``"linf"`` or ``"l2"``.
        steps: iterations per run; ``None`` takes the attack's ``default_steps``.
        restarts: random restarts; ``None`` takes the attack's ``default_restarts``.
        alpha: step size in pixel units, for attacks with a fixed step (``uses_alpha``); ``None`` takes the
            attack's default. Attacks that adapt their step size refuse an explicit ``alpha``.
        seed: seed of the attack's own randomness; the same seed gives the same ``x_adv``.

    Attributes:
        name: the registry name, set by ``register_attack``.
        eps: the radius as a float.
        norm: ``"linf"`` or ``"l2"``.
        steps: resolved iteration count.
        restarts: resolved restart count.
        seed: the seed.
    """

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 10
    default_restarts: ClassVar[int] = 1
    uses_alpha: ClassVar[bool] = False
    #: True for attacks whose settings are fixed by their protocol (``steps``/``restarts`` refused).
    fixed_settings: ClassVar[bool] = False
    #: True for attacks whose ``_perturb`` takes ``sample_ids`` (randomness per sample, not per batch).
    per_sample_randomness: ClassVar[bool] = False

    def __init__(
        self,
        *,
        eps: float | str,
        norm: str = "linf",
        steps: int | None = None,
        restarts: int | None = None,
        alpha: float | None = None,
        seed: int = 0,
    ):
        label = self.name or type(self).__name__
        self.norm = check_norm(norm)
        self.eps = parse_eps(eps, field=f"{label}: eps", norm=self.norm)
        if self.fixed_settings and (steps is not None or restarts is not None):
            raise ConfigError(
                f"{label}: steps and restarts are fixed by this attack's protocol; leave them unset "
                f"(got steps={steps}, restarts={restarts})"
            )
        self.steps = self.default_steps if steps is None else check_whole_number(f"{label}: steps", steps, 1)
        self.restarts = (
            self.default_restarts if restarts is None else check_whole_number(f"{label}: restarts", restarts, 1)
        )
        if alpha is not None and not self.uses_alpha:
            raise ConfigError(f"{label}: alpha is not used (this attack adapts its step size); leave it unset")
        if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"{label}: alpha must be a positive number in pixel units, got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{label}: seed must be an integer, got {seed!r}")
        self.seed = seed

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adversarial examples for ``model`` at ``(x, y)``.

        Args:
            model: maps ``(B, C, H, W)`` pixels in ``[0, 1]`` to ``(B, K)`` logits; in eval mode.
            x: clean images ``(B, C, H, W)`` in ``[0, 1]``.
            y: true labels ``(B,)``.
            sample_ids: ``(B,)`` whole numbers naming the samples (their dataset positions). Attacks with
                ``per_sample_randomness`` then draw each sample's randomness from ``(seed, id)``, so a sample's
                ``x_adv`` does not depend on the batch it is in; others ignore them.

        Returns:
            ``x_adv``, detached, same shape as ``x``, within ``eps`` of ``x`` and in ``[0, 1]``.
        """
        if x.dim() != 4 or y.shape != (x.shape[0],):
            raise ConfigError(
                f"{self.name}: expected x (B, C, H, W) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        x = x.detach()
        y = y.detach().to(device=x.device, dtype=torch.long)
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        per_sample = {} if sample_ids is None or not self.per_sample_randomness else {"sample_ids": sample_ids}
        with frozen_parameters(model):
            x_adv = self._perturb(model, x, y, **per_sample)
        return x_adv.detach().to(x.dtype)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack itself; ``x`` and ``y`` are detached and on the same device, ``eps > 0``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The settings as written to results files: ``attack``, ``eps_value``, ``eps``, ``norm``,
        ``steps``, ``restarts``."""
        return {
            "attack": self.name,
            "eps_value": self.eps,
            "eps": format_eps(self.eps),
            "norm": self.norm,
            "steps": self.steps,
            "restarts": self.restarts,
        }

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k not in ("attack", "eps_value"))
        return f"{type(self).__name__}({settings})"
