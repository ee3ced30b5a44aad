"""SVHN (cropped digits, 32 x 32) from torchvision's train_32x32.mat / test_32x32.mat, held in memory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset, resize_images
from .errors import Source

SOURCE = Source(
    name="svhn", env="ADAKD_DATA_SVHN",
    expected="<root>/train_32x32.mat and <root>/test_32x32.mat (format 2, cropped digits, from "
             "http://ufldl.stanford.edu/housenumbers/, as torchvision's SVHN keeps them)",
    parent_subdir="svhn")
# Commonly quoted train-split statistics; used at every image_size (resizing moves them very little).
INFO = {"num_classes": 10, "image_size": 32, "channels": 3,
        "mean": (0.4377, 0.4438, 0.4728), "std": (0.1980, 0.2010, 0.1970)}
CLASSES = [str(d) for d in range(10)]


def info(image_size: int = 32, **_load_options: object) -> dict:
    """num_classes, image_size, channels, mean and std, known without the files."""
    return {**INFO, "image_size": image_size}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # scipy comes with scikit-learn; imported here, only SVHN needs it

    if not path.is_file():
        raise SOURCE.error(f"missing file {path.name}", path)
    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3) ... on bad files
        raise SOURCE.error(f"cannot read {path.name} as a MATLAB file ({type(exc).__name__}: {exc}); the file is "
                           "truncated or corrupt", path) from None
    for key in ("X", "y"):
        if key not in mat:
            raise SOURCE.error(f"{path.name} has no variable {key!r} (it has {sorted(k for k in mat if k[0] != '_')})",
                               path)
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise SOURCE.error(f"{path.name}: X must be a 32 x 32 x 3 x N uint8 array, got {x.shape} {x.dtype}", path)
    if y.shape[0] != x.shape[3]:
        raise SOURCE.error(f"{path.name} holds {x.shape[3]} images but {y.shape[0]} labels", path)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise SOURCE.error(f"{path.name} labels lie in [{y.min()}, {y.max()}], not 1..10", path)
    return x, y


def load(split: str, root: str | os.PathLike | None = None, *, image_size: int = 32) -> ArrayDataset:
    """SVHN `split` ("train" 73,257 or "test" 26,032 images) as an ArrayDataset of 3 x image_size x image_size."""
    x, y = _read(SOURCE.resolve_root(root) / f"{split}_32x32.mat")
    # X is H x W x C x N (MATLAB's order); the label 10 stands for the digit 0.
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    targets = torch.from_numpy((y % 10).astype(np.int64))
    # No flip: a mirrored digit is no longer that digit.
    return ArrayDataset(resize_images(images, image_size), targets, classes=CLASSES, mean=INFO["mean"],
                        std=INFO["std"], augment="crop" if split == "train" else "none",
                        crop_padding=max(image_size // 8, 1))
