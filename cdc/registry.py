"""The one registry helper behind every pluggable part: models, datasets, discriminants, criteria,
budgets, inference forms.

A param names an entry; registration is a decorator (or `add`), a name registered twice is a
programming error, and an unknown name is the user's: an `InputError` that lists the known names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from cdc.errors import InputError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, read-only as a mapping; `kind` names the entries in messages ("model")."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@MODELS.register("resnet20")` above the factory."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:  # type: ignore[override]  # unknown names raise, never default
        if name not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(sorted(self))}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self)})"
