"""Models by name from timm and torchvision: `create("timm:convnext_atto")`, `create("torchvision:resnet18")`.

They are always randomly initialised (timm `pretrained=False`, torchvision `weights=None`): adakd never downloads.
Published weights are downloaded by the user and loaded from a file (`model.weights=PATH`, a .pth state_dict or a
.safetensors file). Their staged view is derived automatically (auto_staged.py), unless the class has a
hand-written layout (torchvision's ResNet does: adakd/models/imagenet/resnet.py).

`in_chans`: timm builds the model for it; torchvision has no such argument, so its first Conv2d is replaced by
one with `in_chans` inputs (`layers.with_input_channels`: same place and settings, fresh kaiming weights).
"""
from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from adakd.registry import UnknownNameError, suggestions

SOURCES = ("timm", "torchvision")
TIMM_INSTALL = 'pip install "adakd[timm]" (or pip install -e ".[timm]" from a checkout)'


class ModelSourceError(ValueError):
    """A timm / torchvision model cannot be built as asked (pretrained weights, timm missing)."""


def split_source(name: str) -> tuple[str | None, str]:
    """('timm', 'resnet18') for 'timm:resnet18'; (None, name) for a zoo name."""
    source, colon, arch = name.partition(":")
    if not colon:
        return None, name
    if source not in SOURCES:
        raise UnknownNameError(f"unknown model source {source!r} in {name!r}; use one of "
                               + ", ".join(f"'{s}:<name>'" for s in SOURCES) + " or a zoo name")
    return source, arch


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelSourceError(f"timm models need the timm package: {TIMM_INSTALL}") from None
    return timm


def names(source: str) -> list[str]:
    """Every model name timm or torchvision offers (torchvision: classifiers only)."""
    if source == "timm":
        return list(_timm().list_models())
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))  # classifiers only


def available_external(source: str, pattern: str = "*") -> list[str]:
    """'source:name' for every model of timm or torchvision matching a shell wildcard."""
    if source not in SOURCES:
        raise UnknownNameError(f"unknown model source {source!r}; use one of {', '.join(SOURCES)}")
    return [f"{source}:{name}" for name in names(source) if fnmatch.fnmatchcase(name, pattern)]


def _refuse_pretrained(source: str, arch: str, kwargs: dict[str, Any]) -> None:
    asked = kwargs.pop("pretrained", False) or (source == "torchvision" and kwargs.pop("weights", None) is not None)
    if asked:
        raise ModelSourceError(
            f"{source}:{arch} is built with random weights only: adakd never downloads. Download the pretrained "
            f"weights yourself and pass the file as model.weights=PATH (a {source} state_dict .pth or a "
            ".safetensors file); they are loaded strictly with adakd.models.load_weights")


def create_external(source: str, arch: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm or torchvision classifier with `num_classes` outputs and `in_chans` inputs."""
    _refuse_pretrained(source, arch, kwargs)
    known = names(source)
    if arch not in known:
        close = suggestions(arch, known, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(f'{source}:{c}') for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown {source} model {arch!r}.{hint} List them with "
                               f"adakd.models.available('*', source={source!r})")
    if source == "timm":
        return _timm().create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    import torchvision

    from adakd.models.layers import with_input_channels

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    return with_input_channels(model, in_chans)
