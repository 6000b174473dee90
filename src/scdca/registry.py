"""A tiny name -> object registry used for models, metrics and encoders."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from scdca.errors import ScdcaInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; an unknown name raises and lists the choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ScdcaInputError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def parse_list(self, spec: str | Iterable[str], *, arg: str) -> list[str]:
        """Parse 'a,b,c' or 'all' into validated names; errors name the argument."""
        names = spec.split(",") if isinstance(spec, str) else list(spec)
        names = [n.strip() for n in names if n.strip()]
        if names == ["all"]:
            return self.names()
        bad = [n for n in names if n not in self._entries]
        if bad or not names:
            raise ScdcaInputError(
                f"{arg}: unknown {self.kind} name(s) {bad!r}; choose from: {', '.join(self.names())} (or 'all')"
            )
        return names

    def __contains__(self, name: str) -> bool:
        return name in self._entries
