"""The distiller registry."""
from __future__ import annotations

from adakd.registry import Registry

DISTILLERS: Registry = Registry("distiller")


def register_distiller(name: str):
    """Register a Distiller subclass under `name`."""
    return DISTILLERS.register(name)


def available(pattern: str = "*") -> list[str]:
    """Names of the registered distillers."""
    return DISTILLERS.available(pattern)


def get(name: str) -> type:
    """The Distiller class registered as `name`."""
    return DISTILLERS.get(name)
