"""The model registry: `@register_model` builders, `create(name)`, `available(pattern)`; timm/torchvision names."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from adakd.models.external import available_external, check_external, create_external, split_source
from adakd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def register_model(builder: Callable[..., nn.Module], name: str | None = None) -> Callable[..., nn.Module]:
    """Register `builder(num_classes=...)` under `name` (default: its function name); usable as a decorator.

    A model without a hand-written layout gets the automatic staged view (torch.fx), so every distiller and
    strategy can use it.
    """
    if not callable(builder):
        raise TypeError(f"register_model needs a callable builder(num_classes=...) returning an nn.Module, got "
                        f"{type(builder).__name__}")
    if name is None and getattr(builder, "__name__", "<lambda>") == "<lambda>":
        raise ValueError("register_model(lambda ...) needs a name=: a lambda has none")
    return MODELS.register(name)(builder)


def create(name: str, num_classes: int = 100, **kwargs: Any) -> nn.Module:
    """Build the model `name` with `num_classes` outputs; `model(x)` returns logits.

    `name` is a zoo name or 'timm:<name>' / 'torchvision:<name>' (they also take `in_chans`, and `pretrained`:
    adakd.models.external).
    """
    source, arch = split_source(name)
    if source is not None:
        return create_external(source, arch, num_classes=num_classes, **kwargs)
    return MODELS.create(name, num_classes=num_classes, **kwargs)


def available(pattern: str = "*", source: str = "zoo") -> list[str]:
    """Names matching a shell wildcard: the zoo's, or 'timm:...' / 'torchvision:...' with `source`."""
    if source == "zoo":
        return MODELS.available(pattern)
    return available_external(source, pattern)


def check_name(name: str) -> None:
    """Raise UnknownNameError (with suggestions) unless `name` is a zoo, timm or torchvision model; builds nothing."""
    source, arch = split_source(name)
    if source is None:
        MODELS.get(name)
    else:
        check_external(source, arch)
