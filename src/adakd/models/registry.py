"""The model registry: `@register_model` builders, `create(name)`, `available(pattern)`."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from adakd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model builder under its function name."""
    return MODELS.register()(builder)


def create(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build the zoo model `name` with `num_classes` outputs; `model(x)` returns logits."""
    return MODELS.create(name, num_classes=num_classes, **kwargs)


def available(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell wildcard."""
    return MODELS.available(pattern)
