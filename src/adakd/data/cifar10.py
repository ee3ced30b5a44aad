"""CIFAR-10 from the python-pickle version its authors distribute (cifar-10-python.tar.gz), read as cifar.py reads
CIFAR-100: with the restricted unpickler, so a crafted file cannot run code."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset
from .cifar import load_pickle
from .errors import Source

SOURCE = Source(
    name="cifar10", env="ADAKD_DATA_CIFAR10",
    expected="<root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch and batches.meta as distributed "
             "at https://www.cs.toronto.edu/~kriz/cifar.html (the python version, cifar-10-python.tar.gz, unpacked)")
# The SAKD code's CIFAR-10 normalisation (dataset/cifar.py get_cifar_10), the values most CIFAR-10 code copies. Its
# std is not the per-pixel std of the train set (that is (0.2470, 0.2435, 0.2616)); we reproduce the authors' code.
INFO = {"num_classes": 10, "image_size": 32, "channels": 3,
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}
FOLDER = "cifar-10-batches-py"
FILES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}


def find_folder(root: Path) -> Path:
    """The cifar-10-batches-py folder: root's child of that name, or root itself."""
    for folder in (root / FOLDER, root):
        if (folder / "batches.meta").is_file() or (folder / "test_batch").is_file():
            return folder
    raise SOURCE.error(f"no {FOLDER} folder", root / FOLDER)


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's N x 3072 uint8 images and N int64 labels, checked."""
    obj = load_pickle(path, SOURCE)
    for key in (b"data", b"labels"):
        if key not in obj:
            raise SOURCE.error(f"{path.name} has no key {key!r} (keys: {list(obj)[:8]})", path)
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise SOURCE.error(f"{path.name} b'data' must be an N x 3072 uint8 array, got {shape} "
                           f"{getattr(data, 'dtype', '')}", path)
    try:
        labels = np.asarray(obj[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise SOURCE.error(f"{path.name} b'labels' is not a list of integers", path) from None
    if labels.shape != (data.shape[0],):
        raise SOURCE.error(f"{path.name} has {data.shape[0]} images but {labels.size} labels", path)
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise SOURCE.error(f"{path.name} labels lie in [{labels.min()}, {labels.max()}], not [0, 10)", path)
    return data, labels


def load(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """CIFAR-10 `split` ("train" 50,000 or "test" 10,000 images) as an in-memory ArrayDataset."""
    folder = find_folder(SOURCE.resolve_root(root))
    meta_path = folder / "batches.meta"
    meta = load_pickle(meta_path, SOURCE)
    if b"label_names" not in meta:
        raise SOURCE.error(f"batches.meta has no key b'label_names' (keys: {list(meta)[:8]})", meta_path)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    if len(classes) != INFO["num_classes"]:
        raise SOURCE.error(f"batches.meta lists {len(classes)} label names, not 10", meta_path)
    batches = [_batch(folder / name) for name in FILES[split]]
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major: already C x H x W.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return ArrayDataset(images, torch.from_numpy(labels), classes=classes, mean=INFO["mean"], std=INFO["std"],
                        augment="crop_flip" if split == "train" else "none", crop_padding=4)
