"""Datasets and device-side loaders.

    ds = load_dataset("cifar100", "train", root=None)      # root, else $ADAKD_DATA_CIFAR100, else $ADAKD_DATA
    loader = make_loader(ds, 64, train=True, device=device, seed=0)
    loader.set_epoch(epoch)
    for images, targets, indices in loader: ...

In-memory datasets (cifar100, tiny-imagenet, digits, synthetic) are ArrayDatasets and are augmented in batches on
the device; imagenet is a folder dataset read by a torch DataLoader.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from adakd.registry import suggestions

from . import cifar, digits, imagenet, synthetic, tiny_imagenet
from .arrays import ArrayDataset
from .errors import DatasetError
from .imagenet import FolderDataset
from .loader import ArrayLoader, FolderLoader, make_loader

_MODULES = {"cifar100": cifar, "tiny-imagenet": tiny_imagenet, "imagenet": imagenet, "digits": digits,
            "synthetic": synthetic}
DATASETS = tuple(_MODULES)
SPLITS = ("train", "test")

__all__ = ["DATASETS", "ArrayDataset", "ArrayLoader", "DatasetError", "FolderDataset", "FolderLoader",
           "dataset_info", "load_dataset", "make_loader"]


def _module(name: str) -> Any:
    if name not in _MODULES:
        close = suggestions(name, list(DATASETS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}{hint}")
    return _MODULES[name]


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None,
                 **options: Any) -> torch.utils.data.Dataset:
    """Load `split` ("train" or "test") of dataset `name`; problems with the files raise DatasetError."""
    module = _module(name)
    if split not in SPLITS:
        raise DatasetError(f"{name}: unknown split {split!r}; choose 'train' or 'test' (tiny-imagenet's and "
                           f"imagenet's 'test' is the official val)")
    return module.load(split, root, **options)


def dataset_info(name: str, **options: Any) -> dict:
    """num_classes, image_size, channels, mean and std of a dataset, known without its files.

    Takes the same options as load_dataset; only the shape options of digits and synthetic (image_size,
    num_classes) change the answer, the others are checked by load_dataset.
    """
    module = _module(name)
    return module.info(**options) if hasattr(module, "info") else dict(module.INFO)
