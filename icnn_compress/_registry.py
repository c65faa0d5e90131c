"""One small name -> object registry, shared by models, datasets and pruning criteria."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from icnn_compress.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Register by name with a decorator (a duplicate name raises), list, and look up with a
    "did you mean" suggestion.

    Args:
        kind: what is registered, for messages ("model", "dataset", "criterion").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"A {self.kind} named {name!r} is already registered.")
            self._items[name] = obj
            return obj

        return wrap

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}.")
        return self._items[name]
