"""Writers of tiny files in the real dataset formats (imported by conftest.py and the tests)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    """Pickle obj; protocol 2 is what the CIFAR authors' Python 2 files use."""
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def cifar_split(n: int, seed: int) -> dict:
    """A split dict as the CIFAR authors pickle it: bytes keys, an N x 3072 uint8 array, label lists."""
    rng = np.random.RandomState(seed)
    return {b"batch_label": b"fake", b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
            b"fine_labels": [int(v) for v in rng.randint(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.randint(0, 20, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def write_jpeg(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    """A random-noise JPEG of size (width, height) in mode "RGB" or "L" (grayscale, as some tiny-ImageNet files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8)).save(path, quality=95)  # 2-D array -> mode "L"
