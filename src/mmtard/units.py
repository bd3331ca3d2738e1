"""Perturbation budgets: written as fractions of the pixel range (``4/255``), stored as floats.

Every radius the user writes (``--eps``, ``method.eps``, ``method.alpha``, ``eval.eps``) is read here, once:
``parse_eps("4/255")`` is the float ``0.01568...`` and is never rescaled afterwards.

- L-infinity radii are per-pixel distances in ``[0, 1]``: a bare ``4`` is almost always meant on the 0..255
  scale and is refused with a hint, never silently rescaled.
- L2 radii are lengths of a whole image's perturbation in ``[0, 1]`` pixel units, so values above 1 are
  common (``--norm l2 --eps 2``); they only have to be finite and not negative.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from mmtard.errors import ConfigError

NORMS = ("linf", "l2")
#: the metadata of a config dataclass field that holds a radius (or a PGD step) in pixel-range units: a config
#: reader reads it with :func:`parse_eps` (``dataclasses.field(..., metadata=RADIUS)``)
RADIUS = {"unit": "radius"}


def is_radius(spec: dataclasses.Field) -> bool:
    """Whether a dataclass field holds radii (its metadata is :data:`RADIUS`)."""
    return spec.metadata.get("unit") == RADIUS["unit"]


#: the largest l2 radius accepted: beyond the l2 diameter of a 3 x 4096 x 4096 image, every image is reachable
L2_MAX_RADIUS = 1e4


def parse_eps(value: str | float | int, field: str = "eps", norm: str = "linf") -> float:
    """Parse an attack radius (or step size) given as a fraction of the ``[0, 1]`` pixel range.

    Args:
        value: ``"4/255"``, ``"0.0157"``, or a number.
        field: the flag or config field it came from; every error message starts with it.
        norm: ``"linf"`` (the radius must lie in ``[0, 1]``) or ``"l2"`` (any finite radius ``>= 0``).

    Returns:
        The radius as a float.

    Raises:
        ConfigError: unreadable, not finite (NaN, inf), negative, or above 1 for ``linf``.
    """
    if norm not in NORMS:
        raise ConfigError(f"{field}: unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    text = str(value).strip()
    try:
        if isinstance(value, bool):
            raise ValueError(text)
        number = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ConfigError(
            f"{field}: cannot read {value!r}; write a fraction of the pixel range such as 4/255"
        ) from None
    if not math.isfinite(number):
        raise ConfigError(f"{field}: expected a finite radius such as 4/255, got {value!r}")
    if number < 0:
        raise ConfigError(f"{field}: must not be negative, got {value!r}")
    if norm == "linf" and number > 1:
        raise ConfigError(
            f"{field}: {value!r} is larger than the whole pixel range [0, 1]; linf radii are fractions of the "
            f"range, so write {text}/255 if you meant {text} on the 0..255 scale"
        )
    if norm == "l2" and number > L2_MAX_RADIUS:
        raise ConfigError(
            f"{field}: an l2 radius of {value!r} is beyond the l2 diameter of any image (sqrt(3 x H x W) of the "
            f"[0, 1] pixels: 55 at 32 px, 388 at 224 px, 1,774 at 1,024 px); expected at most {L2_MAX_RADIUS:g}"
        )
    return number


def format_eps(value: float) -> str:
    """``0.0156862...`` -> ``"4/255"`` when the value is a whole number of 255ths, else the decimal (a radius
    too small to be one 255th, ``1e-12``, is not ``0/255``)."""
    in_255 = value * 255
    if abs(in_255 - round(in_255)) < 1e-6 and (round(in_255) != 0 or value == 0):
        return f"{round(in_255)}/255"
    return f"{value:.6g}"
