"""Errors raised for bad input. Each names the field and what was expected."""


class ConfigError(ValueError):
    """A value given by the user (flag, config field, file) is wrong; the message says which and why."""
