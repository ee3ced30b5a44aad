"""MNIST and Fashion-MNIST from their four raw IDX files (plain or gzipped), held in memory as 1 x 28 x 28 uint8.

Looked for, in order, in <root>/<Folder>/raw, <root>/<Folder>, <root>/raw and <root> itself (<Folder> is MNIST or
FashionMNIST, torchvision's layout; the last two take the four files as distributed, or as a distribution package
installs them). Given image_size, the images are resized once (bilinear, antialiased). The mean and std are the
published train-split values at 28 px, used at every size: resizing moves them by far less than normalisation needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arrays import ArrayDataset, resize_images
from .errors import Source
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

_PREFIX = {"train": "train", "test": "t10k"}


@dataclass(frozen=True)
class IdxDataset:
    """One IDX dataset: where it is looked for, its class names, statistics and training augmentation."""

    source: Source
    folder: str  # torchvision's folder name below root
    classes: tuple[str, ...]
    mean: float
    std: float
    augment: str

    def info(self, image_size: int = 28, **_load_options: object) -> dict:
        """num_classes, image_size, channels, mean and std, known without the files."""
        return {"num_classes": len(self.classes), "image_size": image_size, "channels": 1, "mean": (self.mean,),
                "std": (self.std,)}

    def find(self, root: Path, stem: str) -> Path:
        """The file `stem` (plain, else .gz) in the first of the searched folders that holds it."""
        for folder in (root / self.folder / "raw", root / self.folder, root / "raw", root):
            for path in (folder / stem, folder / f"{stem}.gz"):
                if path.is_file():
                    return path
        raise self.source.error(f"missing file {stem} (or {stem}.gz)", root / self.folder / "raw" / stem)

    def load(self, split: str, root: str | os.PathLike | None = None, *, image_size: int = 28) -> ArrayDataset:
        """`split` ("train" 60,000 or "test" 10,000) as an ArrayDataset of 1 x image_size x image_size uint8."""
        base = self.source.resolve_root(root)
        images_path = self.find(base, f"{_PREFIX[split]}-images-idx3-ubyte")
        labels_path = self.find(base, f"{_PREFIX[split]}-labels-idx1-ubyte")
        images = read_idx(images_path, IMAGES_MAGIC, self.source)
        labels = read_idx(labels_path, LABELS_MAGIC, self.source)
        if images.shape[1:] != (28, 28):
            raise self.source.error(f"{images_path.name} holds {images.shape[1]} x {images.shape[2]} images, not "
                                    "28 x 28", images_path)
        if labels.shape[0] != images.shape[0]:
            raise self.source.error(f"{labels_path.name} holds {labels.shape[0]} labels but {images_path.name} "
                                    f"{images.shape[0]} images", labels_path)
        if labels.size and labels.max() >= len(self.classes):
            raise self.source.error(f"{labels_path.name} holds label {int(labels.max())}, outside 0..9", labels_path)
        pixels = resize_images(torch.from_numpy(images.copy()).unsqueeze(1), image_size)
        return ArrayDataset(pixels, torch.from_numpy(labels.astype("int64")), classes=self.classes,
                            mean=(self.mean,), std=(self.std,), augment=self.augment if split == "train" else "none",
                            crop_padding=max(image_size // 8, 1))


_LAYOUT = ("{folder}/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
           "t10k-labels-idx1-ubyte (each may end in .gz), as torchvision lays them out; the four files directly in "
           "<root> or <root>/raw are accepted too")
MNIST = IdxDataset(
    source=Source(name="mnist", env="ADAKD_DATA_MNIST",
                  expected="<root>/" + _LAYOUT.format(folder="MNIST") + " (http://yann.lecun.com/exdb/mnist/)"),
    folder="MNIST",
    classes=("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
             "8 - eight", "9 - nine"),
    # No flip for digits: a mirrored 2, 3, 5 or 7 is no longer that digit.
    mean=0.1307, std=0.3081, augment="crop")
FASHION_MNIST = IdxDataset(
    source=Source(name="fashion-mnist", env="ADAKD_DATA_FASHION_MNIST",
                  expected="<root>/" + _LAYOUT.format(folder="FashionMNIST")
                           + " (https://github.com/zalandoresearch/fashion-mnist)"),
    folder="FashionMNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    # Flipping is safe here: a mirrored shoe, bag or shirt is still the same kind of garment (the articles are
    # photographed in one orientation, and no class is the mirror image of another).
    mean=0.2860, std=0.3530, augment="crop_flip")
