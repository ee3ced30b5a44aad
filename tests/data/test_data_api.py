"""The public API: names, splits, dataset_info without files, ArrayDataset checks and the synthetic generator."""
from __future__ import annotations

import pytest
import torch

from adakd.data import DATASETS, ArrayDataset, DatasetError, dataset_info, load_dataset


def test_names_and_errors() -> None:
    assert DATASETS == ("cifar100", "cifar10", "tiny-imagenet", "imagenet", "digits", "synthetic", "mnist",
                        "fashion-mnist", "svhn", "stl10", "folder")
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="unknown dataset 'cifar-100'.*did you mean cifar100"):
        load_dataset("cifar-100", "train")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("digits", "val")


@pytest.mark.parametrize("name, classes, size", [("cifar100", 100, 32), ("cifar10", 10, 32),
                                                 ("tiny-imagenet", 200, 64), ("imagenet", 1000, 224),
                                                 ("digits", 10, 32), ("synthetic", 10, 32)])
def test_dataset_info_needs_no_files(name: str, classes: int, size: int) -> None:
    info = dataset_info(name)
    assert (info["num_classes"], info["image_size"], info["channels"]) == (classes, size, 3)
    assert len(info["mean"]) == len(info["std"]) == 3 and all(0 < s < 1 for s in info["std"])


@pytest.mark.parametrize("name, channels, size, mean", [("mnist", 1, 28, (0.1307,)), ("fashion-mnist", 1, 28, (0.2860,)),
                                                         ("svhn", 3, 32, (0.4377, 0.4438, 0.4728)),
                                                         ("stl10", 3, 96, (0.4467, 0.4398, 0.4066))])
def test_dataset_info_of_the_new_file_datasets(name: str, channels: int, size: int, mean: tuple) -> None:
    info = dataset_info(name)
    assert (info["num_classes"], info["image_size"], info["channels"], info["mean"]) == (10, size, channels, mean)
    assert len(info["std"]) == channels and dataset_info(name, image_size=64)["image_size"] == 64


def test_dataset_info_follows_shape_options() -> None:
    assert dataset_info("synthetic", num_classes=4, image_size=16, size=10)["num_classes"] == 4
    assert dataset_info("tiny-imagenet", tiny_aug="crop")["image_size"] == 64


def test_synthetic_is_seeded_and_learnable() -> None:
    train = load_dataset("synthetic", "train", num_classes=4, image_size=16, size=64, seed=3)
    again = load_dataset("synthetic", "train", num_classes=4, image_size=16, size=64, seed=3)
    test = load_dataset("synthetic", "test", num_classes=4, image_size=16, size=32, seed=3)
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    other_seed = load_dataset("synthetic", "train", num_classes=4, image_size=16, size=64, seed=4)
    assert not torch.equal(train.images, other_seed.images)
    assert torch.bincount(train.targets).tolist() == [16] * 4
    assert (train.augment, test.augment, train.crop_padding) == ("crop_flip", "none", 2)
    # Train and test share the class templates: nearest class mean of train classifies test almost perfectly.
    centroids = torch.stack([train.images[train.targets == k].double().mean(0) for k in range(4)])
    distance = (test.images.double()[:, None] - centroids[None]).flatten(2).norm(dim=-1)
    assert (distance.argmin(1) == test.targets).double().mean() > 0.9


def test_array_dataset_checks_its_arrays() -> None:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    kwargs = dict(classes=["a", "b"], mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(images.float(), torch.zeros(4, dtype=torch.int64), **kwargs)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        ArrayDataset(images, torch.tensor([0, 1, 2, 0]), **kwargs)
    with pytest.raises(ValueError, match="augment must be one of"):
        ArrayDataset(images, torch.zeros(4, dtype=torch.int64), augment="mixup", **kwargs)
    ds = ArrayDataset(images, torch.zeros(4, dtype=torch.int64), augment="flip", crop_padding=4, **kwargs)
    assert ds.crop_padding == 0  # padding only matters when the augmentation crops
