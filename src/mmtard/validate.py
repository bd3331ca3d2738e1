"""The small validators every layer shares, with one wording: ``"<field>: expected <what>, got <value>"``, and the
seed ceilings they check.

A base-floor module (it imports only :mod:`mmtard.errors`): config dataclasses, attacks and the command line call
these instead of keeping their own copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mmtard.errors import ConfigError

#: the largest seed a command takes: torch's generators take 64-bit seeds (``torch.Generator().manual_seed``)
MAX_SEED = 2**63 - 1
#: the largest ``train.seed``: the data order, the attacks' random starts and each process's generator take seeds
#: derived from it (``seed * 1_000_003 + step``...), which must stay within :data:`MAX_SEED`
MAX_TRAIN_SEED = 2**32 - 1


def check_choice(field: str, value: object, allowed: Sequence[str]) -> None:
    """``value`` is one of ``allowed``.

    Raises:
        ConfigError: ``"<field>: expected one of a, b, got 'c'"``.
    """
    if value not in allowed:
        raise ConfigError(f"{field}: expected one of {', '.join(allowed)}, got {value!r}")


def check_number(
    field: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    expected: str | None = None,
) -> None:
    """``value`` is a finite real number (not a bool) in the interval from ``low`` to ``high`` (each end included
    unless ``low_open`` / ``high_open``).

    Args:
        expected: what the message says is expected (``"a positive learning rate"``); by default the interval,
            ``"a number in [0, 1)"``.

    Raises:
        ConfigError: ``"<field>: expected <expected>, got <value>"``.
    """
    real = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not real and expected is None:
        raise ConfigError(f"{field}: expected a finite number, got {value!r}")
    too_low = real and low is not None and (value <= low if low_open else value < low)
    too_high = real and high is not None and (value >= high if high_open else value > high)
    if not real or too_low or too_high:
        if expected is None:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            expected = f"a number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{field}: expected {expected}, got {value!r}")


def whole_number_range(low: int | None = None, high: int | None = None) -> str:
    """The words for the whole numbers from ``low`` to ``high``: ``"a whole number >= 1"``, ``"... from 0 to 9"``."""
    if low is None and high is None:
        return "a whole number"
    if high is None:
        return f"a whole number >= {low}"
    if low is None:
        return f"a whole number <= {high}"
    return f"a whole number from {low} to {high}"


def check_whole_number(field: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` is an ``int`` (not a bool) from ``low`` to ``high`` (either end may be open); returns it.

    Raises:
        ConfigError: ``"<field>: expected a whole number >= 1, got 0"``.
    """
    whole = not isinstance(value, bool) and isinstance(value, int)
    if not whole or (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{field}: expected {whole_number_range(low, high)}, got {value!r}")
    return value
