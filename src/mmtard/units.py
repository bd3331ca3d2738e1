"""Perturbation budgets: written as fractions of the pixel range (``4/255``), stored as floats in ``[0, 1]``."""

from __future__ import annotations

from fractions import Fraction

from mmtard.errors import ConfigError


def parse_eps(value: str | float | int, field: str = "eps") -> float:
    """Parse an attack radius given as a fraction of the ``[0, 1]`` pixel range.

    Accepts ``"4/255"``, ``"0.0157"`` or a float in ``[0, 1]``. A bare number above 1 (``4``) is almost
    always a radius meant in 0..255 units and is refused with a hint, never silently rescaled.
    """
    text = str(value).strip()
    try:
        number = float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{field}: cannot read {value!r}; write a fraction of the pixel range such as 4/255"
        ) from None
    if number > 1:
        raise ConfigError(
            f"{field}: {value!r} is larger than the whole pixel range [0, 1]; radii are fractions of the "
            f"range, so write {text}/255 if you meant {text} on the 0..255 scale"
        )
    if number < 0:
        raise ConfigError(f"{field}: must not be negative, got {value!r}")
    return number


def format_eps(value: float) -> str:
    """``0.0156862...`` -> ``"4/255"`` when the value is a whole number of 255ths, else the decimal."""
    in_255 = value * 255
    if abs(in_255 - round(in_255)) < 1e-6:
        return f"{round(in_255)}/255"
    return f"{value:.6g}"
