"""ImageNet (ILSVRC-2012) from class folders, decoded per item by torchvision in DataLoader workers."""
from __future__ import annotations

import os
from typing import Any

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .errors import DatasetError, Source

SOURCE = Source(
    name="imagenet", env="ADAKD_DATA_IMAGENET",
    # ImageNet's licence needs a login, so adakd cannot download it: the text says how to make the layout by hand.
    expected="<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG with the same 1000 class folders. ImageNet "
             "cannot be downloaded for you: register at https://image-net.org, download ILSVRC2012_img_train.tar, "
             "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz (ILSVRC-2012) into <root>, and run "
             "python -c \"import torchvision.datasets as d; d.ImageNet('<root>', split='train'); "
             "d.ImageNet('<root>', split='val')\" once: torchvision unpacks them into exactly this layout, the val "
             "images sorted into their class folders",
    parent_subdir="imagenet")
INFO = {"num_classes": 1000, "image_size": 224, "channels": 3,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_FOLDER = {"train": "train", "test": "val"}


def make_transform(split: str, mean: tuple[float, ...], std: tuple[float, ...], size: int = 224) -> transforms.Compose:
    """torchvision's standard ImageNet pipeline: RandomResizedCrop + flip to train, resize + centre crop to test.

    The test resize keeps ImageNet's ratio 256 / 224 between the resized short side and the crop.
    """
    geometry = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if split == "train"
                else [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(mean, std)])


class FolderDataset(torch.utils.data.Dataset):
    """An ImageFolder whose items are (normalised image, target, index); the index is what CRD's memory needs.

    `folder` is an ImageFolder or any dataset of (image, target) items with its classes, targets, samples and root.
    """

    def __init__(self, folder: ImageFolder, *, mean: tuple[float, ...], std: tuple[float, ...], augment: str) -> None:
        self.folder = folder
        self.classes = list(folder.classes)
        self.num_classes = len(self.classes)
        self.targets = torch.tensor(folder.targets, dtype=torch.int64)
        self.mean, self.std, self.augment = mean, std, augment

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        try:
            image, target = self.folder[index]
        except OSError as err:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            path = self.folder.samples[index][0]
            raise DatasetError(f"cannot decode image {path!r} ({type(err).__name__}: {err}); replace or remove the "
                               "file") from None
        return image, target, index

    def __repr__(self) -> str:
        return f"FolderDataset({len(self)} images, {self.num_classes} classes, {self.folder.root})"


def _classes(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise SOURCE.error(f"missing folder {os.path.basename(folder)}/", folder)
    try:
        return find_classes(folder)[0]
    except FileNotFoundError:
        raise SOURCE.error(f"{os.path.basename(folder)}/ has no class folders", folder) from None


def load(split: str, root: str | os.PathLike | None = None) -> FolderDataset:
    """ImageNet `split` ("train", or "test" = the official val) as a FolderDataset with torchvision transforms."""
    base = os.fspath(SOURCE.resolve_root(root))
    train_classes, val_classes = _classes(os.path.join(base, "train")), _classes(os.path.join(base, "val"))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise SOURCE.error(f"train/ has {len(train_classes)} class folders and val/ {len(val_classes)}; only in "
                           f"train: {only_train}, only in val: {only_val}", base)
    path = os.path.join(base, _FOLDER[split])
    try:
        folder = ImageFolder(path, transform=make_transform(split, INFO["mean"], INFO["std"]))
    except FileNotFoundError as exc:  # torchvision's message names the class folder that holds no image
        raise SOURCE.error(f"a class folder has no images: {exc}", path) from None
    return FolderDataset(folder, mean=INFO["mean"], std=INFO["std"],
                         augment="random_resized_crop_flip" if split == "train" else "none")
