"""CIFAR-100 from the python-pickle version its authors distribute, read with a restricted unpickler."""
from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import ArrayDataset
from .errors import Source

SOURCE = Source(
    name="cifar100", env="ADAKD_DATA_CIFAR100",
    expected="<root>/cifar-100-python/train, test, meta as distributed at https://www.cs.toronto.edu/~kriz/cifar.html "
             "(the python version, cifar-100-python.tar.gz, unpacked)")
INFO = {"num_classes": 100, "image_size": 32, "channels": 3,
        "mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)}

# Exactly the globals a pickled numpy ndarray refers to (numpy 1.x writes numpy.core, 2.x numpy._core; protocol 5
# uses _frombuffer; protocol 2 from Python 3 encodes bytes through _codecs.encode). Anything else, such as os.system
# in a crafted file, is refused, so loading a dataset file cannot run code.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _Refused(pickle.UnpicklingError):
    """A pickle names a global outside _ALLOWED (its message is that global)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _Refused(f"refused global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 warns on the old alias
        return getattr(importlib.import_module(module), name)


def load_pickle(path: Path, source: Source) -> dict:
    """Load one pickled dict with bytes keys; any malformed or unsafe content becomes a DatasetError."""
    if not path.is_file():
        raise source.error(f"missing file {path.name}", path)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except _Refused as exc:
        raise source.error(f"refusing to read {path.name}: {exc} (a CIFAR file holds only arrays, lists, bytes and "
                           f"ints), so it is not a CIFAR file; nothing in it was executed", path) from None
    except Exception as exc:  # an untrusted file can fail in many ways; each is the same user-facing problem
        raise source.error(f"cannot read {path.name} as a CIFAR pickle ({type(exc).__name__}: {exc}); the file is "
                           f"truncated, corrupt or not the python version", path) from None
    if not isinstance(obj, dict):
        raise source.error(f"{path.name} holds a {type(obj).__name__}, not the dict CIFAR files hold", path)
    return obj


def _field(obj: dict, key: bytes, path: Path) -> Any:
    if key not in obj:
        raise SOURCE.error(f"{path.name} has no key {key!r} (keys: {list(obj)[:8]})", path)
    return obj[key]


def find_folder(root: Path) -> Path:
    """The cifar-100-python folder: root itself or its child of that name."""
    for folder in (root / "cifar-100-python", root):
        if (folder / "meta").is_file() or (folder / "train").is_file():
            return folder
    raise SOURCE.error("no cifar-100-python folder", root / "cifar-100-python")


def load(split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """CIFAR-100 `split` ("train" 50,000 or "test" 10,000 images) as an in-memory ArrayDataset."""
    folder = find_folder(SOURCE.resolve_root(root))
    meta_path, path = folder / "meta", folder / split
    classes = [n.decode() if isinstance(n, bytes) else str(n)
               for n in _field(load_pickle(meta_path, SOURCE), b"fine_label_names", meta_path)]
    if len(classes) != INFO["num_classes"]:
        raise SOURCE.error(f"meta lists {len(classes)} fine label names, not 100", meta_path)
    obj = load_pickle(path, SOURCE)
    data, labels = _field(obj, b"data", path), _field(obj, b"fine_labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise SOURCE.error(f"{split} b'data' must be an N x 3072 uint8 array, got {shape} "
                           f"{getattr(data, 'dtype', '')}", path)
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise SOURCE.error(f"{split} b'fine_labels' is not a list of integers", path) from None
    if labels.shape != (data.shape[0],):
        raise SOURCE.error(f"{split} has {data.shape[0]} images but {labels.size} fine labels", path)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise SOURCE.error(f"{split} fine labels lie in [{labels.min()}, {labels.max()}], not [0, 100)", path)
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major: already C x H x W.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return ArrayDataset(images, torch.from_numpy(labels), classes=classes, mean=INFO["mean"], std=INFO["std"],
                        augment="crop_flip" if split == "train" else "none", crop_padding=4)
