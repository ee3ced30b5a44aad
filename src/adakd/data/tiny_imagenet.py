"""Tiny-ImageNet (200 classes, 64 x 64) decoded once from its JPEG tree into an in-memory ArrayDataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .arrays import ArrayDataset
from .errors import DatasetError, Source

SOURCE = Source(
    name="tiny-imagenet", env="ADAKD_DATA_TINY_IMAGENET",
    expected="<root>/tiny-imagenet-200/ with wnids.txt, words.txt (optional), train/<wnid>/images/<wnid>_<k>.JPEG, "
             "val/images/val_<k>.JPEG and val/val_annotations.txt, as unpacked from "
             "http://cs231n.stanford.edu/tiny-imagenet-200.zip (val/ sorted into class folders val/<wnid>/images/ or "
             "val/<wnid>/, as ImageFolder code such as mdistiller's reads it, is accepted too)")
# CIFAR-10 statistics, not tiny-ImageNet's own: the SAKD code normalises this way and we reproduce it.
INFO = {"num_classes": 200, "image_size": 64, "channels": 3,
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}
_JPEG = (".jpeg", ".jpg")


def find_folder(root: Path) -> Path:
    """The tiny-imagenet-200 folder: root itself or its child of that name."""
    for folder in (root / "tiny-imagenet-200", root):
        if (folder / "wnids.txt").is_file():
            return folder
    raise SOURCE.error("no tiny-imagenet-200 folder with wnids.txt", root / "tiny-imagenet-200" / "wnids.txt")


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SOURCE.error(f"cannot read {path.name} ({type(exc).__name__}: {exc})", path) from None


def _class_names(folder: Path, wnids: list[str]) -> list[str]:
    """Human-readable names from words.txt (first synonym) where present, else the wnid itself."""
    words = {}
    if (folder / "words.txt").is_file():
        for line in _read_lines(folder / "words.txt"):
            wnid, _, names = line.partition("\t")
            words[wnid] = names.split(",")[0].strip()
    return [words.get(w) or w for w in wnids]


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        found = sorted(p for p in images.glob("*") if p.suffix.lower() in _JPEG) if images.is_dir() else []
        if not found:
            raise SOURCE.error(f"class folder {wnid} has no JPEG images", images)
        files += found
        labels += [label] * len(found)
    return files, labels


def _sorted_val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """val/ sorted into class folders, val/<wnid>/images/*.JPEG or val/<wnid>/*.JPEG (mdistiller's ImageFolder)."""
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted(p.name for p in (folder / "val").iterdir() if p.is_dir() and p.name not in index)
    if unknown:
        raise SOURCE.error(f"val/ holds class folders that wnids.txt does not list: {unknown[:5]}", folder / "val")
    files, labels = [], []
    for label, wnid in enumerate(wnids):
        images = folder / "val" / wnid / "images"
        images = images if images.is_dir() else folder / "val" / wnid
        found = sorted(p for p in images.glob("*") if p.suffix.lower() in _JPEG) if images.is_dir() else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise SOURCE.error("the class folders in val/ hold no JPEG images", folder / "val")
    return files, labels


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    """The official val layout (val/images/ listed by val/val_annotations.txt), else val/ sorted by class."""
    val = folder / "val"
    annotations = val / "val_annotations.txt"
    if not (val / "images").is_dir() and val.is_dir() and any(p.is_dir() for p in val.iterdir()):
        return _sorted_val_files(folder, wnids)
    if not annotations.is_file():
        raise SOURCE.error("missing val/val_annotations.txt (and val/ is not sorted into class folders)", annotations)
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(_read_lines(annotations), start=1):
        fields = line.split("\t")
        if len(fields) != 6 or fields[1] not in index or not all(f.lstrip("-").isdigit() for f in fields[2:]):
            raise SOURCE.error(f"val_annotations.txt line {number} is malformed ({line!r}); each line must be "
                               f"'<file>\\t<wnid from wnids.txt>\\t<4 box ints>' separated by tabs", annotations)
        files.append(folder / "val" / "images" / fields[0])
        labels.append(index[fields[1]])
    if not files:
        raise SOURCE.error("val_annotations.txt lists no images", annotations)
    return files, labels


def decode_rgb(files: list[Path], size: int, source: Source) -> torch.Tensor:
    """Decode JPEGs into one uint8 N x 3 x size x size tensor (grayscale images are converted to RGB)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # how PIL reports bad files
            raise source.error(f"cannot decode {path.name} ({type(exc).__name__}: {exc})", path) from None
        if rgb.shape != (size, size, 3):
            raise source.error(f"{path.name} is {rgb.shape[1]}x{rgb.shape[0]}, not {size}x{size}", path)
        out[i] = rgb
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load(split: str, root: str | os.PathLike | None = None, *, tiny_aug: str = "flip") -> ArrayDataset:
    """Tiny-ImageNet `split` ("train" 100,000 images, or "test" = the official val, 10,000) as an ArrayDataset.

    tiny_aug: "flip" (the SAKD recipe: horizontal flip only) or "crop" (random crop 64 with padding 4, plus flip).
    """
    if tiny_aug not in ("flip", "crop"):
        raise DatasetError(f"tiny-imagenet: option tiny_aug must be 'flip' or 'crop', got {tiny_aug!r}")
    folder = find_folder(SOURCE.resolve_root(root))
    wnids = sorted(_read_lines(folder / "wnids.txt"))  # sorted, as torchvision's ImageFolder orders classes
    if len(wnids) != len(set(wnids)) or not wnids:
        raise SOURCE.error("wnids.txt is empty or repeats a wnid", folder / "wnids.txt")
    files, labels = (_train_files if split == "train" else _val_files)(folder, wnids)
    images = decode_rgb(files, INFO["image_size"], SOURCE)
    augment = "none" if split != "train" else ("crop_flip" if tiny_aug == "crop" else "flip")
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), classes=_class_names(folder, wnids),
                        mean=INFO["mean"], std=INFO["std"], augment=augment, crop_padding=4)
