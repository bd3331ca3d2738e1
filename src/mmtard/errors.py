"""Errors raised for bad input. Each names the field and what was expected."""

from __future__ import annotations

import importlib
from types import ModuleType


class ConfigError(ValueError):
    """A value given by the user (flag, config field, file) is wrong; the message says which and why."""


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss or weights; nothing non-finite was written. The message
    names the step and the last good checkpoint."""


class WorkerTimeoutError(RuntimeError):
    """Under torchrun, another process did not answer a collective within ``train.dist_timeout_s`` (a
    stalled or dead worker); the run stopped instead of waiting. The message names the last good checkpoint."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; the message says how to resume.

    Attributes:
        signum: the signal that stopped it.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class MissingExtraError(ConfigError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def import_optional(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or raise one clear error naming the extra to install.

    Args:
        module: the module to import (``"matplotlib.pyplot"``).
        extra: the ``mmtard`` extra that installs it (``"plots"``).
        needed_for: what needs it, for the message (``"the demo's plots"``).

    Raises:
        MissingExtraError: ``"<module>: not installed, needed for <what>; pip install 'mmtard[<extra>]'"``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the module is there but one of its own imports is broken: a real bug, keep the traceback
        raise MissingExtraError(
            f"{top}: not installed, needed for {needed_for}; pip install 'mmtard[{extra}]' (or mmtard[all])"
        ) from None
