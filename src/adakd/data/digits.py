"""The embedded real dataset: scikit-learn's 1,797 handwritten digits (8 x 8, values 0..16), no download needed.

Split: 36 images of each class go to "test" (360), the other 1,437 to "train", drawn by numpy's legacy
RandomState(0), whose stream numpy guarantees never to change, one permutation per class in class order. Images are
upsampled once to image_size (bilinear), scaled to 0..255 and repeated to 3 channels, because the model zoo takes RGB.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import ArrayDataset
from .errors import DatasetError

TEST_PER_CLASS = 36
SPLIT_SEED = 0
# Measured on the train split at image_size 32, in 0..1 units (tests/data/test_digits.py recomputes them). Other
# sizes measure their own: bilinear upsampling smooths the strokes, so the std depends on the size (0.376 at 8 px).
DEFAULT_SIZE = 32
MEAN = (0.3058,) * 3
STD = (0.3241,) * 3


def split_indices(targets: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted dataset indices of each split: TEST_PER_CLASS per class to test, the rest to train."""
    rng = np.random.RandomState(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:TEST_PER_CLASS]
                           for c in range(int(targets.max()) + 1)])
    is_test = np.zeros(len(targets), dtype=bool)
    is_test[test] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def stats(image_size: int = DEFAULT_SIZE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the train split at image_size, in 0..1 units."""
    if image_size == DEFAULT_SIZE:
        return MEAN, STD
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = _upsample(digits.images[split_indices(digits.target)["train"]], image_size).to(torch.float64) / 255.0
    return (float(train.mean()),) * 3, (float(train.std(unbiased=False)),) * 3


def info(image_size: int = DEFAULT_SIZE, **_load_options: object) -> dict:
    """num_classes, image_size, channels, mean and std of the digits at image_size."""
    mean, std = stats(image_size)
    return {"num_classes": 10, "image_size": image_size, "channels": 3, "mean": mean, "std": std}


def load(split: str, root: str | os.PathLike | None = None, *, image_size: int = 32) -> ArrayDataset:
    """The digits `split` ("train" 1,437 or "test" 360) as an ArrayDataset of 3 x image_size x image_size uint8 images.

    The data ships inside scikit-learn, so a root is refused rather than ignored (a user who gives one expects it to
    be read). Training augmentation is a random crop with padding image_size // 8 and no flip: a mirrored 2, 3, 5
    or 7 is no longer that digit.
    """
    from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn

    if root is not None:
        raise DatasetError(f"digits: data.root={os.fspath(root)!r} is not read: the digits ship inside scikit-learn. "
                           "Remove data.root, or pick the dataset that lives there with data.name=...")

    digits = load_digits()
    splits = split_indices(digits.target)
    images = _upsample(digits.images[splits[split]], image_size)
    mean, std = stats(image_size)
    return ArrayDataset(images, torch.from_numpy(digits.target[splits[split]].astype(np.int64)),
                        classes=[str(d) for d in digits.target_names], mean=mean, std=std,
                        augment="crop" if split == "train" else "none", crop_padding=image_size // 8)


def _upsample(images: np.ndarray, image_size: int) -> torch.Tensor:
    """8 x 8 values 0..16 -> uint8 N x 3 x image_size x image_size, bilinear, 0..255."""
    pixels = torch.from_numpy(images).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return pixels.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
