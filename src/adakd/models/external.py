"""Models by name from timm and torchvision: `create("timm:convnext_atto")`, `create("torchvision:resnet18")`.

Random weights by default. `pretrained=True` starts from published ImageNet weights, through each library's own
mechanism, with the classifier resized to `num_classes` (fresh weights) and the first convolution adapted to
`in_chans` (timm's rule: summed for 1 channel, repeated and rescaled otherwise):
- timm: `timm.create_model(name, pretrained=True, ...)` reads the Hugging Face hub (cache `$HF_HOME/hub`;
  `HF_HUB_OFFLINE=1` reads only the cache); a tag picks the weights (`timm:resnet18.a1_in1k`);
  `pretrained=PATH` loads a weights file instead (timm's `pretrained_cfg_overlay=dict(file=PATH)`), and
  `timm:local-dir:FOLDER` / `timm:hf-hub:REPO` name a model by its config.json and weights.
- torchvision: `pretrained=True` is the model's DEFAULT weights enum, `pretrained="IMAGENET1K_V2"` a named one;
  downloaded once into `torch.hub.get_dir()/checkpoints` (`$TORCH_HOME/hub`) and read from there offline; loaded
  with `weights_only=True`.
`pretrained_preprocessing` says how the weights expect their images (mean, std, size, interpolation). A file of
weights of one's own is loaded afterwards with `model.weights=PATH` (adakd.models.load_weights). Their staged view
is derived automatically (auto_staged.py), unless the class has a hand-written layout (torchvision's ResNet does:
adakd/models/imagenet/resnet.py).

`in_chans`: timm builds the model for it; torchvision has no such argument, so its first Conv2d is replaced by
one with `in_chans` inputs (`layers.with_input_channels`: same place and settings, fresh kaiming weights, or the
pretrained ones adapted).
"""
from __future__ import annotations

import fnmatch
import functools
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from adakd.registry import UnknownNameError, suggestions

SOURCES = ("timm", "torchvision")
TIMM_PREFIXES = ("hf-hub:", "local-dir:")  # timm names whose architecture and weights come from a repo / folder
TIMM_INSTALL = 'pip install "adakd[timm]" (or pip install -e ".[timm]" from a checkout)'


class ModelSourceError(ValueError):
    """A timm / torchvision model cannot be built as asked (pretrained weights missing or unknown, timm missing)."""


@dataclass(frozen=True)
class Preprocessing:
    """How pretrained weights expect their images: normalisation in 0..1 units, square input size, resampling."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    interpolation: str
    source: str  # where these values come from, said in the run's log


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


def check_external(source: str, arch: str) -> None:
    """Raise UnknownNameError (with suggestions) unless `arch` names a model of `source`; builds nothing.

    timm names may carry a pretrained tag (`resnet18.a1_in1k`) or a `hf-hub:` / `local-dir:` prefix, whose
    config timm reads when it builds the model.
    """
    if source == "timm" and arch.startswith(TIMM_PREFIXES):
        return
    base, _, tag = arch.partition(".") if source == "timm" else (arch, "", "")
    known = names(source)
    if base not in known:
        close = suggestions(base, known, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(f'{source}:{c}') for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown {source} model {base!r}.{hint} List them with "
                               f"adakd.models.available('*', source={source!r})")
    if tag:
        tagged = _timm().list_pretrained(f"{base}.*")
        if arch not in tagged:
            listed = ", ".join(f"timm:{t}" for t in tagged[:8]) or "none: it has no published weights"
            raise UnknownNameError(f"timm model {base!r} has no weights tagged {tag!r}; its tags: {listed}")


def create_external(source: str, arch: str, num_classes: int = 1000, in_chans: int = 3,
                    pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """A timm or torchvision classifier with `num_classes` outputs and `in_chans` inputs, from published weights
    when `pretrained` says so (module docstring), else randomly initialised."""
    if source == "torchvision" and "weights" in kwargs:
        raise ModelSourceError(f"torchvision:{arch}: give the weights as pretrained=NAME (e.g. pretrained=DEFAULT "
                               "or IMAGENET1K_V1), not as a builder argument")
    check_external(source, arch)
    if source == "timm":
        if pretrained is False:
            return _timm().create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                        **kwargs)
        return _timm_pretrained(arch, pretrained, num_classes, in_chans, kwargs)
    import torchvision

    from adakd.models.layers import with_input_channels

    if pretrained is False:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        return with_input_channels(model, in_chans)
    return _torchvision_pretrained(arch, pretrained, num_classes, in_chans, kwargs)


def with_config_key(err: ModelSourceError, key: str) -> ModelSourceError:
    """The error with its `pretrained=` spelled as the config key the user wrote (model.pretrained=...)."""
    return ModelSourceError(str(err).replace("pretrained=", f"{key}.pretrained="))


def first_line(err: BaseException) -> str:
    """The first line of an exception's text (or its type), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def unpickling_reason(err: BaseException) -> str:
    """Why a file did not load, in one line; torch's weights_only refusal is reduced to the global it names."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if isinstance(err, pickle.UnpicklingError) and found:
        return (f"it holds the Python object {found.group(1)}, not only weights; it was refused unread, as a pickle "
                "could run code")
    return first_line(err)


# --- timm ---------------------------------------------------------------------------------------------------------

def _timm_file(arch: str, pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"pretrained={pretrained!r} for timm:{arch}: no such file. Give true (timm's "
                               "published weights; a tag in the name picks them, e.g. timm:resnet18.a1_in1k) or "
                               "the path of a weights file (.safetensors or .pth)")
    return path


def _timm_cfg(arch: str) -> dict[str, Any]:
    """The pretrained_cfg timm would use for `arch` (a registry name, tagged or not, or a hf-hub:/local-dir: name)."""
    timm = _timm()
    if arch.startswith("local-dir:"):
        from timm.models._hub import load_model_config_from_path

        try:
            return dict(load_model_config_from_path(arch[len("local-dir:"):])[0])
        except (OSError, ValueError, KeyError) as err:
            raise ModelSourceError(f"timm:{arch}: cannot read the folder's config.json ({first_line(err)}); the "
                                   "folder needs config.json and model.safetensors (or pytorch_model.bin), as "
                                   "timm's save_for_hf writes them") from None
    if arch.startswith("hf-hub:"):
        from timm.models._hub import load_model_config_from_hf

        try:
            return dict(load_model_config_from_hf(arch[len("hf-hub:"):])[0])
        except (OSError, ValueError) as err:
            raise ModelSourceError(_hub_miss(f"timm:{arch}", arch[len("hf-hub:"):], err)) from None
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _hub_miss(what: str, repo: str, err: BaseException) -> str:
    from huggingface_hub import constants

    return (f"pretrained weights of {what} could not be loaded ({first_line(err)}); they come from the Hugging "
            f"Face hub repo {repo} (https://huggingface.co/{repo}), cached in {constants.HF_HUB_CACHE} ($HF_HOME/hub). "
            "To work offline, download its model.safetensors on a connected machine and pass pretrained=PATH, or "
            f"copy that machine's cache folder models--{repo.replace('/', '--')} into the cache and set "
            "HF_HUB_OFFLINE=1")


def _check_timm_has_weights(arch: str) -> None:
    if arch.startswith(TIMM_PREFIXES) or _timm().models.is_model_pretrained(arch.partition(".")[0]):
        return
    close = suggestions(arch, [n.partition(".")[0] for n in _timm().list_pretrained()], cutoff=0.6)
    hint = f" Close names that have weights: {', '.join(f'timm:{c}' for c in close)}." if close else ""
    raise ModelSourceError(f"timm:{arch} has no published pretrained weights.{hint} List those that do with "
                           "timm.list_pretrained(); or pass a weights file as pretrained=PATH")


def _timm_pretrained(arch: str, pretrained: bool | str, num_classes: int, in_chans: int,
                     kwargs: dict[str, Any]) -> nn.Module:
    timm = _timm()
    overlay: dict[str, Any] = {}
    if isinstance(pretrained, str):
        overlay = {"pretrained_cfg_overlay": {"file": str(_timm_file(arch, pretrained))}}
    else:
        _check_timm_has_weights(arch)
    cfg = {} if overlay else _timm_cfg(arch)
    try:
        return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans, **overlay,
                                 **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        if overlay:
            raise ModelSourceError(f"pretrained={pretrained!r} does not load into timm:{arch} "
                                   f"({unpickling_reason(err)}); give the weights file of that architecture") from None
        if cfg.get("hf_hub_id"):
            raise ModelSourceError(_hub_miss(f"timm:{arch}", cfg["hf_hub_id"], err)) from None
        where = cfg.get("url") or cfg.get("file") or "timm's pretrained_cfg"
        raise ModelSourceError(f"pretrained weights of timm:{arch} could not be loaded ({first_line(err)}) from "
                               f"{where}; download the file on a connected machine and pass pretrained=PATH") from None


# --- torchvision --------------------------------------------------------------------------------------------------

def torchvision_weights(arch: str, pretrained: bool | str) -> Any:
    """The torchvision weights enum member `pretrained` names for `arch` (True: DEFAULT)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        enum = None
    members = [m.name for m in enum] if enum is not None else []
    if not members:
        raise ModelSourceError(f"torchvision:{arch} has no published weights; use pretrained=false, or a timm model")
    wanted = "DEFAULT" if pretrained is True else str(pretrained).rpartition(".")[2]  # also 'ResNet50_Weights.X'
    if wanted != "DEFAULT" and wanted not in members:
        if Path(str(pretrained)).expanduser().is_file():
            raise ModelSourceError(f"pretrained={pretrained!r} for torchvision:{arch} is a file: torchvision weights "
                                   f"are named ({', '.join(members)}); load your own file with weights=PATH, or "
                                   f"place the published file in {_torchvision_cache()} to use it offline")
        close = suggestions(wanted, members, n=2, cutoff=0.4)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ModelSourceError(f"torchvision:{arch} has no weights {wanted!r}.{hint} Its weights: true (DEFAULT), "
                               f"{', '.join(members)}")
    return enum[wanted]


def _torchvision_cache() -> str:
    return str(Path(torch.hub.get_dir()) / "checkpoints")


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """RGB filters of a first convolution adapted to `in_chans` inputs as timm does: summed for 1 channel,
    repeated and scaled by 3 / in_chans otherwise (timm is optional, so its rule is restated here)."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_chans / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _torchvision_pretrained(arch: str, pretrained: bool | str, num_classes: int, in_chans: int,
                            kwargs: dict[str, Any]) -> nn.Module:
    import torchvision
    from torchvision.models import _api

    from adakd.models.layers import with_input_channels

    weights = torchvision_weights(arch, pretrained)
    # torchvision's loader unpickles with weights_only=False: force weights_only=True so a file cannot run code.
    safe_loader = functools.partial(torch.hub.load_state_dict_from_url, weights_only=True)
    try:
        with mock.patch.object(_api, "load_state_dict_from_url", safe_loader):
            source = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        cached = Path(_torchvision_cache()) / Path(weights.url).name
        if not cached.is_file():  # torch.hub moves a download into place only once it is complete
            raise ModelSourceError(
                f"pretrained weights {weights} of torchvision:{arch} could not be downloaded from {weights.url} "
                f"({first_line(err)}); without network, download that file on a connected machine and place it as "
                f"{cached} (the cache under $TORCH_HOME/hub, read offline)") from None
        raise ModelSourceError(f"pretrained weights {weights} of torchvision:{arch} in {cached} do not load "
                               f"({unpickling_reason(err)}); delete that file to download it again") from None
    model = with_input_channels(torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs),
                                in_chans)
    state = source.state_dict()
    first_conv = next(name for name, m in source.named_modules() if isinstance(m, nn.Conv2d))
    state[f"{first_conv}.weight"] = adapt_input_conv(in_chans, state[f"{first_conv}.weight"])
    own = model.state_dict()
    categories = len(weights.meta["categories"])
    resized = [key for key, value in own.items() if state[key].shape != value.shape]
    # Only the classifier may differ: its outputs are the weights' categories here, the dataset's classes there.
    other = [key for key in resized if not (state[key].shape[0] == categories and own[key].shape[0] == num_classes)]
    if other:
        raise ModelSourceError(f"pretrained weights {weights} do not fit torchvision:{arch} as built with these "
                               f"arguments ({other[0]}: {tuple(state[other[0]].shape)} vs "
                               f"{tuple(own[other[0]].shape)}); remove the model.args that change it")
    model.load_state_dict({key: value for key, value in state.items() if key not in resized}, strict=False)
    return model


# --- preprocessing ------------------------------------------------------------------------------------------------

def pretrained_preprocessing(name: str, pretrained: bool | str) -> Preprocessing | None:
    """The mean, std, input size and interpolation the published weights of `name` were trained with (None for a
    zoo model or pretrained=False); read from timm's pretrained_cfg or the torchvision enum, without downloading
    weights (a hf-hub: name reads its config.json from the hub cache)."""
    source, arch = split_source(name)
    if source is None or pretrained is False:
        return None
    check_external(source, arch)
    if source == "timm":
        from timm.data import resolve_data_config

        if pretrained is True:
            _check_timm_has_weights(arch)
        else:
            _timm_file(arch, str(pretrained))
        cfg = _timm_cfg(arch)
        if not cfg:
            return None
        data = resolve_data_config(pretrained_cfg=cfg)
        return Preprocessing(tuple(data["mean"]), tuple(data["std"]), int(data["input_size"][-1]),
                             str(data["interpolation"]), f"timm pretrained_cfg of {name}")
    weights = torchvision_weights(arch, pretrained)
    transform = weights.transforms()
    size = transform.crop_size[0] if isinstance(transform.crop_size, (list, tuple)) else transform.crop_size
    interpolation = getattr(transform.interpolation, "value", str(transform.interpolation))
    return Preprocessing(tuple(transform.mean), tuple(transform.std), int(size), str(interpolation),
                         f"torchvision {weights}")
