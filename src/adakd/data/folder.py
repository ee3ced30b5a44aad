"""Your own images: an ImageFolder tree <root>/train/<class>/* and <root>/val/<class>/* (or test/), any classes.

Size rule: a set whose training images fit in IN_MEMORY_BYTES (2 GiB) as uint8, i.e. train images x image_size^2 x
3 bytes with image_size as given or MEMORY_SIZE (32) when not, is decoded once and held as an ArrayDataset at
image_size (default 32), augmented on the device like CIFAR (random crop with padding image_size // 8, plus flip).
A larger set streams as a FolderDataset through torchvision at image_size (default 224): RandomResizedCrop + flip to
train, resize + centre crop to test. `in_memory=True` / `False` overrides the rule; both splits follow the training
split's count, so they always take the same path.

Images are converted to RGB. Held in memory, each is fitted to image_size x image_size: centre-cropped to a square,
then resized (bilinear); one already that size is kept as is. Mean and std are measured on the training split as it
is fed to the model: in memory, exactly over every pixel of the held images; streaming, over a fixed sample of
STATS_SAMPLE training images (numpy RandomState(0)) at the test geometry. Either is computed once per process.

Files whose names start with "." (.DS_Store, ._x.jpg) and folders such as .ipynb_checkpoints are skipped; any other
file that is not an image by its extension is an error, so a stray file is never silently a sample. Images are
torchvision's IMG_EXTENSIONS plus .gif (an animated GIF gives its first frame, as PIL opens it). A 16-bit grayscale
image (PNG mode I;16) is scaled to 8 bits (value / 257, rounded), with one warning per process; PIL alone would clip
it at 255. A symbolic link that leads back into a folder it sits in is an error, not an endless walk.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from .arrays import ArrayDataset, channel_stats
from .errors import DatasetError, Source
from .imagenet import FolderDataset, make_transform

# torchvision's ImageFolder extensions plus GIF, which PIL reads (first frame) like any other image.
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
SOURCE = Source(
    name="folder", env="ADAKD_DATA_FOLDER",
    expected=f"<root>/train/<class>/<image> and <root>/val/<class>/<image> (or test/ when there is no val/), the "
             f"same class folders in both, images ending in {', '.join(IMAGE_EXTENSIONS)}",
    parent_subdir="folder")
IN_MEMORY_BYTES = 2 * 1024 ** 3
MEMORY_SIZE = 32  # default image_size of a set held in memory
STREAM_SIZE = 224  # default image_size of a streamed set
STATS_SAMPLE = 512
_STATS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}
# PIL modes of single-channel images with more than 8 bits per pixel (16-bit PNG and TIFF grayscale).
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WARNED_WIDE: list[str] = []  # the first 16-bit file met in this process, once warned about


def info(image_size: int | None = None, in_memory: bool | None = None, **_load_options: object) -> dict:
    """channels and image_size where the options fix it; num_classes, mean and std need the files (None)."""
    if image_size is None and in_memory is not None:
        image_size = MEMORY_SIZE if in_memory else STREAM_SIZE
    return {"num_classes": None, "image_size": image_size, "channels": 3, "mean": None, "std": None}


def split_folders(base: Path) -> tuple[Path, Path]:
    """(train folder, test folder): <base>/train and <base>/val, else <base>/test."""
    train = base / "train"
    if not train.is_dir():
        raise SOURCE.error("missing folder train/", train)
    for name in ("val", "test"):
        if (base / name).is_dir():
            return train, base / name
    raise SOURCE.error("missing folder val/ (or test/)", base / "val")


def class_folders(folder: Path) -> list[str]:
    """The sorted class folder names in `folder`, hidden folders skipped."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise SOURCE.error(f"{folder.name}/ has no class folders", folder)
    return names


def list_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image below each class folder (recursively, sorted) and its class index."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = []
        # The real paths of the folders from the class folder down to each walked folder: a link that resolves to
        # one of them would be walked forever (each level re-listing the same images).
        chains = {str(folder / name): (os.path.realpath(folder / name),)}
        for directory, subdirs, names in os.walk(folder / name, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for subdir in subdirs:
                chains[os.path.join(directory, subdir)] = _walk_chain(folder, directory, subdir, chains[directory])
            for file in sorted(names):
                if file.startswith("."):
                    continue
                path = Path(directory) / file
                if not file.lower().endswith(IMAGE_EXTENSIONS):
                    raise SOURCE.error(f"{path.relative_to(folder.parent)} is not an image file (class folders may "
                                       f"hold only images); move it out or delete it", path)
                found.append(path)
        if not found:
            raise SOURCE.error(f"class folder {folder.name}/{name} has no images", folder / name)
        files += found
        labels += [label] * len(found)
    return files, labels


def _walk_chain(folder: Path, directory: str, subdir: str, chain: tuple[str, ...]) -> tuple[str, ...]:
    """`chain` extended by the real path of `directory`/`subdir`; a DatasetError if it is already in it (a loop)."""
    path = os.path.join(directory, subdir)
    real = os.path.realpath(path)
    if real not in chain:
        return (*chain, real)
    link = Path(path)
    while not link.is_symlink() and link != folder:  # the link that turns back is the last one on the path
        link = link.parent
    if not link.is_symlink():  # a loop without a link (a bind mount): name the folder that repeats
        link = Path(path)
    target = f" -> {os.readlink(link)}" if link.is_symlink() else ""
    raise SOURCE.error(f"symlink loop: {link.relative_to(folder.parent)}{target} leads back to a folder it sits in, "
                       "so the class folder would be walked forever; remove the link or point it outside the class "
                       "folder", link)


def to_rgb(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """The image (its first frame if animated) in RGB; 16-bit grayscale is scaled to 8 bits, not clipped."""
    if image.mode in WIDE_GRAY_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        if not _WARNED_WIDE:
            _WARNED_WIDE.append(str(path))
            print(f"adakd: warning: folder: {Path(path).parent.name}/{Path(path).name} is 16-bit grayscale (PIL mode "
                  f"{image.mode}); 16-bit images are scaled to 8 bits (value / 257) as they are read", file=sys.stderr,
                  flush=True)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # round(value / 257)
    return image.convert("RGB")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # how PIL reports bad files
        raise SOURCE.error(f"cannot decode {path.parent.name}/{path.name} ({type(exc).__name__}: {exc}); replace "
                           "or remove the file", path) from None


def decode_fitted(files: list[Path], size: int) -> torch.Tensor:
    """uint8 N x 3 x size x size: each image in RGB, centre-cropped to a square and resized (unless already so)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        image = _open_rgb(path)
        if image.size != (size, size):
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _signature(files: list[Path]) -> tuple:
    """Names, sizes and modification times: a changed file invalidates the cached statistics."""
    return tuple((str(p), s.st_size, s.st_mtime_ns) for p, s in ((p, p.stat()) for p in files))


def memory_stats(files: list[Path], size: int, images: torch.Tensor | None = None) -> tuple[tuple, tuple]:
    """Exact per-channel mean and std of the training images held at `size` (decoded unless given)."""
    key = ("memory", size, _signature(files))
    if key not in _STATS:
        _STATS[key] = channel_stats(decode_fitted(files, size) if images is None else images)
    return _STATS[key]


def stream_stats(files: list[Path], size: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std over a fixed seeded sample of STATS_SAMPLE training images at the test geometry."""
    picked = np.sort(np.random.RandomState(0).permutation(len(files))[:STATS_SAMPLE])
    sample = [files[i] for i in picked]
    key = ("stream", size, _signature(sample))
    if key not in _STATS:
        geometry = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                       transforms.PILToTensor()])
        counts = torch.zeros(3, 256, dtype=torch.int64)
        for path in sample:
            pixels = geometry(_open_rgb(path))
            counts += torch.stack([torch.bincount(pixels[c].flatten(), minlength=256) for c in range(3)])
        values = torch.arange(256, dtype=torch.float64) / 255.0
        total = counts.sum(1).to(torch.float64)
        mean = (counts * values).sum(1) / total
        std = ((counts * values ** 2).sum(1) / total - mean ** 2).clamp_min(0).sqrt()
        _STATS[key] = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return _STATS[key]


def holds_in_memory(num_train: int, image_size: int | None) -> bool:
    """The size rule: the training images as uint8 at image_size (MEMORY_SIZE if None) fit in IN_MEMORY_BYTES."""
    size = MEMORY_SIZE if image_size is None else image_size
    return num_train * size * size * 3 <= IN_MEMORY_BYTES


class ImageFiles(torch.utils.data.Dataset):
    """Listed image files decoded to RGB per item and transformed; what FolderDataset streams."""

    def __init__(self, root: Path, files: list[Path], labels: list[int], classes: list[str],
                 transform: Any) -> None:
        self.root, self.classes, self.transform = str(root), classes, transform
        self.samples = [(str(p), label) for p, label in zip(files, labels)]
        self.targets = list(labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        with Image.open(path) as image:  # a bad file raises OSError, which FolderDataset words
            rgb = to_rgb(image, path)
        return self.transform(rgb), target


def load(split: str, root: str | os.PathLike | None = None, *, image_size: int | None = None,
         in_memory: bool | None = None) -> ArrayDataset | FolderDataset:
    """`split` ("train", or "test" = val/ or test/) of an ImageFolder tree, in memory or streamed (module docstring)."""
    if in_memory is not None and not isinstance(in_memory, bool):
        raise DatasetError(f"folder: option in_memory must be true, false or null (decide by size), got {in_memory!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"folder: option image_size must be a positive int, got {image_size!r}")
    base = SOURCE.resolve_root(root)
    train_dir, test_dir = split_folders(base)
    classes, test_classes = class_folders(train_dir), class_folders(test_dir)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise SOURCE.error(f"train/ and {test_dir.name}/ must hold the same class folders; only in train/: "
                           f"{only_train}, only in {test_dir.name}/: {only_test}", base)
    train_files, train_labels = list_images(train_dir, classes)
    files, labels = (train_files, train_labels) if split == "train" else list_images(test_dir, classes)
    if in_memory is None:
        in_memory = holds_in_memory(len(train_files), image_size)
    if in_memory:
        size = image_size or MEMORY_SIZE
        images = decode_fitted(files, size)
        mean, std = memory_stats(train_files, size, images if split == "train" else None)
        return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), classes=classes, mean=mean, std=std,
                            augment="crop_flip" if split == "train" else "none", crop_padding=max(size // 8, 1))
    size = image_size or STREAM_SIZE
    mean, std = stream_stats(train_files, size)
    folder = ImageFiles(train_dir if split == "train" else test_dir, files, labels, classes,
                        make_transform(split, mean, std, size))
    return FolderDataset(folder, mean=mean, std=std, augment="random_resized_crop_flip" if split == "train" else "none")
