"""One registry shape for every extension kind: methods, DIW modes, balances, inner objectives, attacks, datasets.

A registry maps a name to an entry (a class, a function or a spec object)::

    BALANCES = Registry("balance")

    @BALANCES.register("sigmoid")
    class SigmoidBalance(Balance): ...

    BALANCES.get("sigmoid")   # the class; an unknown name is a ConfigError naming the field and the choices
    BALANCES.names()          # sorted names

Each kind has its own module-level registry beside its base class, with ``register_*`` / ``create_*`` /
``list_*`` helpers where the kind needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mmtard.errors import ConfigError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Names to entries of one kind.

    Args:
        field: the config field or flag that selects an entry (``"balance"``, ``"attack"``...); error
            messages name it.
        kind: what an entry is, for messages (defaults to ``field``): ``Registry("name", kind="method")``.
    """

    def __init__(self, field: str, kind: str | None = None):
        self.field = field
        self.kind = kind or field
        self._entries: dict[str, Entry] = {}

    def register(self, name: str) -> Callable[[Entry], Entry]:
        """Decorator: register the decorated class or function under ``name``. One entry may take several names.

        Raises:
            ValueError: ``name`` is already registered to another entry (a programming error, not user input).
        """

        def decorator(entry: Entry) -> Entry:
            self.add(name, entry)
            return entry

        return decorator

    def add(self, name: str, entry: Entry) -> Entry:
        """Register ``entry`` under ``name`` (for entries that are not defined with a decorator)."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.field}: '{name}' is already registered to {self._entries[name]!r}")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry of ``name``.

        Raises:
            ConfigError: unknown name; the message names the field and lists the known names.
        """
        if name not in self._entries:
            raise ConfigError(f"{self.field}: unknown {self.kind} {name!r}; expected one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Entry]]:
        """``(name, entry)`` pairs, sorted by name."""
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
