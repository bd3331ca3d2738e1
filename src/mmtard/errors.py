"""Errors raised for bad input. Each names the field and what was expected."""

from __future__ import annotations

import importlib
from types import ModuleType


class ConfigError(ValueError):
    """A value given by the user (flag, config field, file) is wrong; the message says which and why.

    The message starts with the field, ``"<field>: <what is wrong>"``; the field is read from it once, here.

    Args:
        message: ``"<field>: <what is wrong>"`` (or a sentence without a field).
        field: the field, when the message does not start with it.

    Attributes:
        field: the flag or config field named (``data.dir``, ``--eps``, ``teachers.fare.kind``), or None.
        detail: the message without its leading ``"<field>: "``.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        head, sep, rest = str(message).partition(": ")
        if field is None and sep and head:
            self.field, self.detail = head, rest
        else:
            self.field, self.detail = field, str(message)

    def renamed(self, field: str) -> ConfigError:
        """The same error (of the same class where it can be) naming ``field`` instead: ``"<field>: <detail>"``."""
        try:
            return type(self)(f"{field}: {self.detail}")
        except TypeError:  # an error class with other constructor arguments
            return ConfigError(f"{field}: {self.detail}")

    def within(self, section: str) -> ConfigError:
        """The same error with its field read inside ``section``: ``inner: ...`` becomes ``method.inner: ...``."""
        return ConfigError(f"{section}.{self}")


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
