"""The strategy registry."""
from __future__ import annotations

from adakd.registry import Registry

STRATEGIES: Registry = Registry("strategy")


def register_strategy(name: str):
    """Register a Strategy subclass (or a preset builder) under `name`."""
    return STRATEGIES.register(name)


def available(pattern: str = "*") -> list[str]:
    """Names of the registered strategies."""
    return STRATEGIES.available(pattern)


def get(name: str) -> type:
    """The Strategy class registered as `name`."""
    return STRATEGIES.get(name)
