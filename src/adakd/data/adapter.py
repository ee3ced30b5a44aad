"""A user's torch Dataset of (image, target) or (image, target, index) items, seen as the engine needs it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import DatasetError

_NEEDS = ("items (image tensor C x H x W, int target) or (image, target, index), a .targets sequence (or .labels) "
          "of N int class indices, and .num_classes (or .classes, a list of class names)")


def _targets(dataset: Any, name: str) -> torch.Tensor:
    raw = getattr(dataset, "targets", None)
    if raw is None:
        raw = getattr(dataset, "labels", None)  # torchvision's SVHN and STL10 call them labels
    if raw is None:
        raise DatasetError(f"{name}: the dataset has no .targets (nor .labels); the engine reads every sample's "
                           f"class from it. A registered dataset must provide {_NEEDS}")
    try:
        targets = torch.as_tensor(np.asarray(raw, dtype=np.int64)).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{name}: .targets is not a sequence of ints; a registered dataset must provide "
                           f"{_NEEDS}") from None
    if len(targets) != len(dataset):
        raise DatasetError(f"{name}: .targets has {len(targets)} entries but the dataset {len(dataset)} items")
    return targets


def _num_classes(dataset: Any, name: str) -> int:
    if isinstance(getattr(dataset, "num_classes", None), int):
        return dataset.num_classes
    classes = getattr(dataset, "classes", None)
    if classes is not None and not isinstance(classes, str):
        return len(classes)
    # Not max(target) + 1: a split that lacks the last class would silently get a smaller model head.
    raise DatasetError(f"{name}: the dataset has neither .num_classes nor .classes; a registered dataset must "
                       f"provide {_NEEDS}")


def _check_item(item: Any, target: int, name: str) -> None:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise DatasetError(f"{name}: item 0 is a {type(item).__name__}, not a tuple (image, target) or (image, "
                           f"target, index); a registered dataset must provide {_NEEDS}")
    image, label = item[0], item[1]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DatasetError(f"{name}: item 0's image is {shape}, not a C x H x W tensor (add transforms.ToTensor() "
                           f"and Normalize to the dataset's transform); a registered dataset must provide {_NEEDS}")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: item 0's target is {type(label).__name__} {label!r}, not an int class "
                           "index") from None
    if label != target:
        raise DatasetError(f"{name}: item 0's target is {label} but .targets[0] is {target}; .targets must list "
                           "the items' targets in order")


class IndexedDataset(torch.utils.data.Dataset):
    """Items (image, int target, position index); .targets (int64), .num_classes and .classes as the engine reads.

    The index is always the item's position, whatever third element the wrapped dataset returns: CRD's memory and
    held-out subsets index samples by position in [0, N).
    """

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset, self.name = dataset, name
        self.targets = _targets(dataset, name)
        self.num_classes = _num_classes(dataset, name)
        classes = getattr(dataset, "classes", None)
        self.classes = list(classes) if classes is not None else [str(k) for k in range(self.num_classes)]
        if len(self.targets) and not 0 <= int(self.targets.min()) <= int(self.targets.max()) < self.num_classes:
            raise DatasetError(f"{name}: targets lie in [{int(self.targets.min())}, {int(self.targets.max())}], "
                               f"outside [0, {self.num_classes}) for its {self.num_classes} classes")
        if len(dataset):
            _check_item(dataset[0], int(self.targets[0]), name)  # fail at load, not in a worker mid-epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        item = self.dataset[index]
        return item[0], int(item[1]), index

    def __repr__(self) -> str:
        return f"IndexedDataset({self.name}: {len(self)} items, {self.num_classes} classes, {self.dataset!r})"
