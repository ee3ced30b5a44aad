"""A seeded, learnable toy dataset for unit tests: each class is a fixed smooth random template plus noise."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .arrays import ArrayDataset
from .errors import DatasetError

NOISE_STD = 48.0  # in 0..255 units: strong enough that a model must learn, weak enough that it learns in few steps
# Approximate statistics of the generator (templates average 0.5), fixed so they need no data to be known.
MEAN = (0.5, 0.5, 0.5)
STD = (0.27, 0.27, 0.27)
_SPLIT_STREAM = {"train": 1, "test": 2}


def info(num_classes: int = 10, image_size: int = 32, **_load_options: object) -> dict:
    """num_classes, image_size, channels, mean and std of the synthetic data."""
    return {"num_classes": num_classes, "image_size": image_size, "channels": 3, "mean": MEAN, "std": STD}


def templates(num_classes: int, image_size: int, seed: int) -> torch.Tensor:
    """One float template per class in 0..255, K x 3 x image_size x image_size, a function of the seed only."""
    generator = torch.Generator().manual_seed(seed << 2)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=generator)
    return 255.0 * F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)


def load(split: str, root: str | os.PathLike | None = None, *, num_classes: int = 10, image_size: int = 32,
         size: int = 256, seed: int = 0) -> ArrayDataset:
    """`size` balanced samples of `split`; train and test share templates (same seed) but draw different noise."""
    if root is not None:  # generated in memory: a root the user gave would be silently ignored
        raise DatasetError(f"synthetic: data.root={os.fspath(root)!r} is not read: the synthetic set is generated in "
                           "memory. Remove data.root, or pick the dataset that lives there with data.name=...")
    generator = torch.Generator().manual_seed((seed << 2) + _SPLIT_STREAM[split])
    targets = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    noise = torch.randn(size, 3, image_size, image_size, generator=generator) * NOISE_STD
    images = (templates(num_classes, image_size, seed)[targets] + noise).round_().clamp_(0, 255).to(torch.uint8)
    return ArrayDataset(images, targets, classes=[f"class_{k}" for k in range(num_classes)], mean=MEAN, std=STD,
                        augment="crop_flip" if split == "train" else "none", crop_padding=max(image_size // 8, 1))
