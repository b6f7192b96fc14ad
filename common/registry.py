"""Name -> implementation tables (export targets, runtimes): one object per name, registered once."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects with a ``name`` attribute, looked up by it. ``unknown(name, known)`` builds the
    exception raised for a name that is not registered."""

    def __init__(self, unknown: Callable[[str, list[str]], Exception]) -> None:
        self._items: dict[str, T] = {}
        self._unknown = unknown

    def register(self, item: T) -> T:
        name = item.name
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{name!r} is already registered")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self._unknown(name, self.names()) from None

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))
