"""Datasets and device-side loaders.

    ds = load_dataset("cifar100", "train", root=None)      # root, else $ADAKD_DATA_CIFAR100, else $ADAKD_DATA,
                                                           # else ~/.cache/adakd/data (default_data_root())
    ds = load_dataset("cifar100", "train", download=True)  # fetch it first when missing (checksummed, once)
    loader = make_loader(ds, 64, train=True, device=device, seed=0)
    loader.set_epoch(epoch)
    for images, targets, indices in loader: ...

In-memory datasets (cifar10, cifar100, tiny-imagenet, digits, synthetic, mnist, fashion-mnist, svhn, stl10, and small
`folder` trees) are ArrayDatasets and are augmented in batches on the device; imagenet and large `folder` trees are
folder datasets read by a torch DataLoader. Your own data: `register_dataset("mine", load)`.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Mapping

import torch

from adakd.registry import suggestions

from . import cifar, cifar10, digits, fetch, folder, imagenet, stl10, svhn, synthetic, tiny_imagenet
from .adapter import IndexedDataset
from .arrays import ArrayDataset
from .errors import DatasetError, default_data_root
from .imagenet import FolderDataset
from .loader import ArrayLoader, FolderLoader, make_loader
from .mnist import FASHION_MNIST, MNIST

# name -> an object with load(split, root, **options) and info(**options) or an INFO dict (a module, or _Registered).
_MODULES: dict[str, Any] = {"cifar100": cifar, "cifar10": cifar10, "tiny-imagenet": tiny_imagenet, "imagenet": imagenet,
                            "digits": digits, "synthetic": synthetic, "mnist": MNIST, "fashion-mnist": FASHION_MNIST,
                            "svhn": svhn, "stl10": stl10, "folder": folder}
DATASETS = tuple(_MODULES)  # the built-in names; available() adds those registered since
SPLITS = ("train", "test")
_UNKNOWN_INFO = {"num_classes": None, "image_size": None, "channels": None, "mean": None, "std": None}

DOWNLOADABLE = tuple(fetch.DOWNLOADS)  # the datasets load_dataset(..., download=True) can fetch

__all__ = ["DATASETS", "DOWNLOADABLE", "ArrayDataset", "ArrayLoader", "DatasetError", "FolderDataset", "FolderLoader",
           "IndexedDataset", "available", "dataset_info", "default_data_root", "load_dataset", "make_loader",
           "register_dataset"]


class _Registered:
    """A user's dataset: their loader, and their info (a dict, a callable taking the load options, or None)."""

    def __init__(self, load: Callable[..., Any], info: Mapping[str, Any] | Callable[..., Mapping] | None) -> None:
        self.load, self._info = load, info

    def info(self, **options: Any) -> dict:
        """The user's info, with None for every key it does not give."""
        given = self._info(**options) if callable(self._info) else (self._info or {})
        return {**_UNKNOWN_INFO, **dict(given)}


def available() -> list[str]:
    """Every dataset name load_dataset accepts: the built-ins, then those registered, in registration order."""
    return list(_MODULES)


def register_dataset(name: str, load: Callable[..., Any],
                     info: Mapping[str, Any] | Callable[..., Mapping] | None = None) -> None:
    """Make `load(split, root, **options)` loadable as dataset `name` (see load_dataset for what it may return).

    info: what dataset_info(name) reports without files: a dict with any of num_classes, image_size, channels,
    mean, std, or a callable taking the load options and returning one; missing keys read None.
    """
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"register_dataset: the name must be a non-empty string, got {name!r}")
    if name in _MODULES:
        kind = "a built-in dataset" if name in DATASETS else "already registered"
        raise DatasetError(f"register_dataset: {name!r} is {kind}; pick another name (taken: {', '.join(_MODULES)})")
    if not callable(load):
        raise DatasetError(f"register_dataset({name!r}): load must be a callable load(split, root, **options), "
                           f"got {type(load).__name__} {load!r}")
    if info is not None and not callable(info) and not isinstance(info, Mapping):
        raise DatasetError(f"register_dataset({name!r}): info must be a dict, a callable returning one, or None, "
                           f"got {type(info).__name__}")
    try:
        inspect.signature(load).bind("train", None)
    except TypeError as err:
        raise DatasetError(f"register_dataset({name!r}): load cannot be called as load(split, root): {err}") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    _MODULES[name] = _Registered(load, info)


def _module(name: str) -> Any:
    if name not in _MODULES:
        names = available()
        close = suggestions(name, names, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(names)}{hint}")
    return _MODULES[name]


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None, *, download: bool = False,
                 mirror: str | None = None, **options: Any) -> torch.utils.data.Dataset:
    """Load `split` ("train" or "test") of dataset `name`; problems with the files raise DatasetError.

    download: fetch the split's files first when they are missing (DOWNLOADABLE datasets; off by default here, as in
    torchvision; the config key data.download is on by default), checksummed and locked, into the folder the loader
    reads; a failed download raises adakd.download.DownloadError. mirror: a base URL replacing the download sites
    (else $ADAKD_DATA_MIRROR); see adakd.data.fetch for the paths a mirror serves.

    A dataset's loader may return an ArrayDataset, a FolderDataset, or any torch Dataset whose items are (image
    tensor, int target) or (image, target, index) with .targets and .num_classes (or .classes); the last kind is
    returned as an IndexedDataset, whose items are (image, target, index).
    """
    module = _module(name)
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r}; choose 'train' or 'test' (tiny-imagenet's and "
                           f"imagenet's 'test' is the official val)")
    folder = fetch.prepare(name, split, root, download=download, mirror=mirror)
    try:
        dataset = module.load(split, folder, **options)
    except DatasetError as err:
        raise fetch.explain_missing(err, name, split, folder, download) from None
    if isinstance(dataset, (ArrayDataset, FolderDataset, IndexedDataset)):
        return dataset
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DatasetError(f"{name}: the loader returned {type(dataset).__name__}, not a dataset; it must return an "
                           f"ArrayDataset, a FolderDataset or a torch Dataset of (image, target) items")
    return IndexedDataset(dataset, name)


def dataset_info(name: str, **options: Any) -> dict:
    """num_classes, image_size, channels, mean and std of a dataset, known without its files (None if unknown).

    Takes the same options as load_dataset; only the shape options (image_size; num_classes of synthetic;
    in_memory of folder) change the answer, the others are checked by load_dataset. A folder dataset's classes and
    statistics need its files, so they read None.
    """
    module = _module(name)
    return module.info(**options) if hasattr(module, "info") else dict(module.INFO)
