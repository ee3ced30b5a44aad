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


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic number, one big-endian uint32 per dimension, then the uint8 values."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    """Write array as an IDX file at path (gzipped to path.gz if gz); returns the path written."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A lossless PNG of an H x W x 3 (RGB) or H x W (grayscale) uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
