"""Name -> constructor registries (timm style), so config strings map to code."""

from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.errors import PipelineError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of constructors; unknown names fail listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def add(self, entry: T) -> T:
        """Register a class under its own `name` (a class decorator)."""
        return self.register(entry.name)(entry)

    def described(self) -> str:
        """`name (its help) | ...`, for the --help of an option that takes these names."""
        return " | ".join(f"{name} ({self._entries[name].help})" for name in self.names())

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise PipelineError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
