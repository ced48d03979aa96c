"""One registry type for every kind of plug-in (model families, alignment metrics, time conventions, spatial
measures, encoders, report pages): a name → item mapping that refuses a second item of a registered name unless
told to replace it, and that keeps its items ordered by an explicit priority (highest first), then by
registration, so that the order never depends on which module was imported first (docs/extending.md)."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """{name: item}, iterated by priority (highest first), then in registration order. `kind` names the items
    in errors ("alignment metric 'cknna' is already registered")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.priority = kind, {}

    def register(self, name: str, item: T, *, priority: int = 0, overwrite: bool = False) -> T:
        """Add `item` as `name`; a registered name is refused unless overwrite=True, which replaces the item
        (and its priority) in place of the old one."""
        if name in self and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered (overwrite=True replaces it)")
        super().__setitem__(name, item)
        self.priority[name] = priority
        ordered = sorted(self.items(), key=lambda kv: -self.priority[kv[0]])        # a stable sort
        self.clear()
        self.update(ordered)
        return item

    def pop(self, name: str, *default):
        """Remove `name` (a plug-in's test puts the registry back as it found it)."""
        self.priority.pop(name, None)
        return super().pop(name, *default)

    def __delitem__(self, name: str) -> None:
        self.pop(name)

    def __setitem__(self, name: str, item: T) -> None:
        """registry[name] = item replaces on purpose (as register(..., overwrite=True), keeping the priority);
        register() is the way to add a plug-in, refusing a name that is taken."""
        self.register(name, item, priority=self.priority.get(name, 0), overwrite=True)

    def copy(self) -> "Registry[T]":
        """A registry of the same kind, items and priorities (a test registers into it and throws it away)."""
        new = Registry(self.kind)
        for name, item in self.items():
            new.register(name, item, priority=self.priority[name])
        return new
