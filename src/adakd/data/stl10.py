"""STL-10 (10 classes, 96 x 96) from the binary version torchvision unpacks into stl10_binary/, held in memory."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset, resize_images
from .errors import Source

SOURCE = Source(
    name="stl10", env="ADAKD_DATA_STL10",
    expected="<root>/stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin and class_names.txt (the binary "
             "version from https://cs.stanford.edu/~acoates/stl10/, stl10_binary.tar.gz unpacked)",
    parent_subdir="stl10")
# Commonly quoted train-split statistics; used at every image_size (resizing moves them very little).
INFO = {"num_classes": 10, "image_size": 96, "channels": 3,
        "mean": (0.4467, 0.4398, 0.4066), "std": (0.2603, 0.2566, 0.2713)}
# The official order, used when class_names.txt is absent (it is the same list).
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_IMAGE_BYTES = 3 * 96 * 96


def info(image_size: int = 96, **_load_options: object) -> dict:
    """num_classes, image_size, channels, mean and std, known without the files."""
    return {**INFO, "image_size": image_size}


def find_folder(root: Path) -> Path:
    """The stl10_binary folder: root's child of that name, or root itself."""
    for folder in (root / "stl10_binary", root):
        if (folder / "train_X.bin").is_file() or (folder / "test_X.bin").is_file():
            return folder
    raise SOURCE.error("no stl10_binary folder with train_X.bin", root / "stl10_binary")


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SOURCE.error(f"missing file {path.name}", path)
    return np.fromfile(path, dtype=np.uint8)


def _classes(folder: Path) -> list[str]:
    path = folder / "class_names.txt"
    if not path.is_file():
        return list(CLASSES)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SOURCE.error(f"cannot read class_names.txt ({type(exc).__name__}: {exc})", path) from None
    if len(names) != 10:
        raise SOURCE.error(f"class_names.txt lists {len(names)} names, not 10", path)
    return names


def load(split: str, root: str | os.PathLike | None = None, *, image_size: int = 96) -> ArrayDataset:
    """STL-10 `split` ("train" 5,000 or "test" 8,000 labelled images) as an ArrayDataset of 3 x size x size."""
    folder = find_folder(SOURCE.resolve_root(root))
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    raw, labels = _read(x_path), _read(y_path)
    if raw.size % _IMAGE_BYTES:
        raise SOURCE.error(f"{x_path.name} is {raw.size} bytes, not a multiple of 3 x 96 x 96 = {_IMAGE_BYTES}; the "
                           "file is truncated or corrupt", x_path)
    if labels.size != raw.size // _IMAGE_BYTES:
        raise SOURCE.error(f"{y_path.name} holds {labels.size} labels but {x_path.name} "
                           f"{raw.size // _IMAGE_BYTES} images", y_path)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise SOURCE.error(f"{y_path.name} labels lie in [{labels.min()}, {labels.max()}], not 1..10", y_path)
    # Each channel is stored column-major (MATLAB's order): file order is channel, column, row, so swap the last
    # two axes to get C x H x W.
    images = torch.from_numpy(np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)))
    return ArrayDataset(resize_images(images, image_size), torch.from_numpy(labels.astype(np.int64) - 1),
                        classes=_classes(folder), mean=INFO["mean"], std=INFO["std"],
                        augment="crop_flip" if split == "train" else "none", crop_padding=max(image_size // 8, 1))
