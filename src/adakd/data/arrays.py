"""In-memory datasets (CIFAR, tiny-ImageNet, digits, MNIST, SVHN, STL-10, small folders ...) as one uint8 tensor."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# "crop" exists for digits, where a horizontal flip would turn a digit into another symbol.
AUGMENTS = ("crop_flip", "crop", "flip", "none")


def normaliser(mean: Sequence[float], std: Sequence[float],
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (C, 1, 1) so that uint8 * scale + shift == (uint8 / 255 - mean) / std."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    # One multiply-add per pixel instead of divide, subtract, divide.
    return 1.0 / (255.0 * std_t), -mean_t / std_t


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images N x C x H x W with int64 targets; items are (normalised float image, target, index).

    Items are never augmented: augmentation is batched on the device by `make_loader`, which reads `augment`
    ("crop_flip", "crop", "flip" or "none") and `crop_padding` (zero padding in pixels before a random crop).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, classes: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], augment: str = "none", crop_padding: int = 0,
                 ids: torch.Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        if targets.dtype != torch.int64 or targets.shape != images.shape[:1]:
            raise ValueError(f"targets must be int64 of shape ({images.shape[0]},), got {targets.dtype} "
                             f"{tuple(targets.shape)}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        if not len(mean) == len(std) == images.shape[1]:
            raise ValueError(f"mean and std need {images.shape[1]} channels, got {len(mean)} and {len(std)}")
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(classes):
            raise ValueError(f"targets must lie in [0, {len(classes)}), got [{int(targets.min())}, "
                             f"{int(targets.max())}]")
        self.images = images.contiguous()
        self.targets = targets
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.crop_padding = int(crop_padding) if "crop" in augment else 0
        self._scale, self._shift = normaliser(self.mean, self.std)
        # A subset keeps the sample ids of its parent, so per-sample state (CRD's memory rows) has one index space.
        if ids is not None and (ids.dtype != torch.int64 or ids.shape != targets.shape):
            raise ValueError(f"ids must be int64 of shape ({targets.shape[0]},)")
        self.ids = ids

    def subset(self, indices: torch.Tensor) -> "ArrayDataset":
        """The samples at `indices`, keeping their ids in this dataset."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        ids = indices if self.ids is None else self.ids[indices]
        return ArrayDataset(self.images[indices], self.targets[indices], classes=self.classes, mean=self.mean,
                            std=self.std, augment=self.augment, crop_padding=self.crop_padding, ids=ids)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.images[index].to(torch.float32).mul_(self._scale).add_(self._shift)
        return image, int(self.targets[index]), index if self.ids is None else int(self.ids[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (f"ArrayDataset({n} images {c}x{h}x{w}, {self.num_classes} classes, augment={self.augment!r}, "
                f"crop_padding={self.crop_padding})")


def resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 N x C x H x W -> uint8 N x C x size x size, bilinear with antialiasing; unchanged if already that size."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    # In chunks: a float copy of a whole set (STL-10 train at 96 px is 550 MB) would double the peak memory.
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel (mean, population std) of uint8 N x C x H x W images, in 0..1 units."""
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])])
    # A 256-bin histogram per channel: exact in float64 and no float copy of the whole set.
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(1).to(torch.float64)
    mean = (counts * values).sum(1) / total
    var = (counts * values ** 2).sum(1) / total - mean ** 2
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.clamp_min(0).sqrt())
