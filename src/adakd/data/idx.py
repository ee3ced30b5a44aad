"""The IDX format of MNIST and Fashion-MNIST, parsed with numpy: magic, big-endian dimensions, then the values."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import Source

IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension (count)


def read_idx(path: Path, magic: int, source: Source) -> np.ndarray:
    """The uint8 array of one IDX file (plain or .gz); a wrong magic number or size is a DatasetError naming it."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip reports a corrupt or truncated stream as one of these
        raise source.error(f"cannot read {path.name} ({type(exc).__name__}: {exc})", path) from None
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim:
        raise source.error(f"{path.name} is {len(raw)} bytes, too short for an IDX header; the file is truncated",
                           path)
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise source.error(f"{path.name} has magic number {found:#010x}, not {magic:#010x} (IDX {kind}); it is not "
                           f"an IDX {kind} file or it is corrupt", path)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    body = len(raw) - 4 - 4 * ndim
    if body != int(np.prod(dims)):
        raise source.error(f"{path.name} declares {' x '.join(map(str, dims))} = {int(np.prod(dims))} values but "
                           f"holds {body} bytes after its header; the file is truncated or corrupt", path)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
