"""The distiller registry."""
from __future__ import annotations

from typing import Callable

from adakd.registry import Registry

DISTILLERS: Registry = Registry("distiller")


# Tags of each registered name: "classic" marks a feature/logit distiller that the contract test
# (tests/distillers/test_contract.py) checks, so a new method joins those checks by its registration alone.
_TAGS: dict[str, frozenset[str]] = {}


def register_distiller(name: str, tags: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Register a Distiller subclass under `name`, with `tags` (e.g. ("classic",)) that `available(tag=)` selects."""
    register = DISTILLERS.register(name)

    def decorate(cls: type) -> type:
        registered = register(cls)
        _TAGS[name] = frozenset(tags)
        return registered

    return decorate


def available(pattern: str = "*", tag: str | None = None) -> list[str]:
    """Names of the registered distillers matching `pattern` (and carrying `tag` when given), in registration order."""
    return [name for name in DISTILLERS.available(pattern) if tag is None or tag in _TAGS.get(name, ())]


def get(name: str) -> type:
    """The Distiller class registered as `name`."""
    return DISTILLERS.get(name)
