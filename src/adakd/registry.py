"""One small registry used for models, distillers and strategies."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


def suggestions(name: str, names: list[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The closest of `names` to `name`, case-insensitive first matches first (`KD` -> `kd`)."""
    lowered = {key.lower(): key for key in names}
    exact = [key for key in names if key.lower() == str(name).lower()]
    close = [lowered[key] for key in difflib.get_close_matches(str(name).lower(), list(lowered), n=n, cutoff=cutoff)]
    return list(dict.fromkeys(exact + close))[:n]


class UnknownNameError(KeyError):
    """A registry lookup failed; the message lists the closest names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to builder callables; duplicates and unknown names raise with a hint."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a builder under `name` (default: the function's name)."""

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = builder
            return builder

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        """Return the builder for `name`, or raise a KeyError naming the closest entries."""
        if name not in self._builders:
            close = suggestions(name, list(self._builders), cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._builders))}"
            )
        return self._builders[name]

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the entry `name` with keyword arguments."""
        return self.get(name)(**kwargs)

    def available(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell wildcard, in registration order."""
        return [n for n in self._builders if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: str) -> bool:
        return name in self._builders
