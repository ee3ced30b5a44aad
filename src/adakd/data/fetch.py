"""What each downloadable dataset fetches, from where, and into which folder (load_dataset(..., download=True)).

The URLs and md5 checksums are read from torchvision's own dataset classes, so they stay torchvision's;
tiny-ImageNet comes from its official zip. Each file goes where its loader reads it, below the dataset's folder:

    cifar10        cifar-10-python.tar.gz   unpacked into cifar-10-batches-py/
    cifar100       cifar-100-python.tar.gz  unpacked into cifar-100-python/
    mnist          MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   (read gzipped, as they are)
    fashion-mnist  FashionMNIST/raw/ with the same four names
    svhn           train_32x32.mat, test_32x32.mat
    stl10          stl10_binary.tar.gz      unpacked into stl10_binary/
    tiny-imagenet  tiny-imagenet-200.zip    unpacked into tiny-imagenet-200/, val/ as the zip lays it out: the SAKD
                                            code reads val/images with val/val_annotations.txt (its
                                            dataset/tiny_imagenet.py make_dataset), and so does tiny_imagenet.py

Only the files of the split asked for are fetched (one archive holds both splits). Archives are kept beside what
they unpack into, as torchvision keeps them: a re-check costs no download, and the folder can serve as a mirror.
A mirror (data.mirror, else $ADAKD_DATA_MIRROR) serves every file at that same path below its base URL.
"""
from __future__ import annotations

import os
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torchvision import datasets as tv

from adakd.download import DownloadError, download, matches, unpack, with_base

from . import cifar, cifar10, stl10, svhn, tiny_imagenet
from .errors import DatasetError, Source
from .mnist import FASHION_MNIST, MNIST, IdxDataset

MIRROR_ENV = "ADAKD_DATA_MIRROR"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


@dataclass(frozen=True)
class Resource:
    """One file to download: its URLs (tried in order), its path below the dataset's folder, md5, and the folder it
    unpacks into (None: read as it is)."""

    urls: tuple[str, ...]
    path: str
    md5: str
    unpacks_into: str | None = None

    def sources(self, mirror: str | None) -> tuple[str, ...]:
        """The URLs to try: the official ones, or the one file at the same path below `mirror`."""
        if not mirror:
            return self.urls
        folder = posixpath.dirname(self.path)
        return (with_base(self.urls[0], mirror.rstrip("/") + ("/" + folder if folder else "")),)


@dataclass(frozen=True)
class Downloadable:
    """A dataset adakd can download: its Source, its files per split, and whether its loader finds a split."""

    source: Source
    resources: Callable[[str], tuple[Resource, ...]]
    present: Callable[[Path, str], bool]


def _finds(find: Callable[[], object]) -> bool:
    try:
        find()
    except DatasetError:
        return False
    return True


def _archive(dataset: type, unpacks_into: str) -> Callable[[str], tuple[Resource, ...]]:
    """torchvision's one archive of `dataset` (its url, filename and tgz_md5), for either split."""
    resource = Resource((dataset.url,), dataset.filename, dataset.tgz_md5, unpacks_into)
    return lambda split: (resource,)


def _idx(dataset: IdxDataset, torchvision_class: type) -> Downloadable:
    """MNIST or Fashion-MNIST: the split's two .gz files from torchvision's mirrors, into <Folder>/raw/."""
    prefix = {"train": "train-", "test": "t10k-"}

    def resources(split: str) -> tuple[Resource, ...]:
        return tuple(Resource(tuple(mirror + name for mirror in torchvision_class.mirrors),
                              f"{dataset.folder}/raw/{name}", md5)
                     for name, md5 in torchvision_class.resources if name.startswith(prefix[split]))

    def present(root: Path, split: str) -> bool:
        return all(_finds(lambda: dataset.find(root, r.path.rsplit("/", 1)[-1].removesuffix(".gz")))
                   for r in resources(split))

    return Downloadable(dataset.source, resources, present)


def _svhn(split: str) -> tuple[Resource, ...]:
    url, filename, md5 = tv.SVHN.split_list[split]
    return (Resource((url,), filename, md5),)


DOWNLOADS: dict[str, Downloadable] = {
    "cifar10": Downloadable(cifar10.SOURCE, _archive(tv.CIFAR10, tv.CIFAR10.base_folder),
                            lambda root, split: _finds(lambda: cifar10.find_folder(root))),
    "cifar100": Downloadable(cifar.SOURCE, _archive(tv.CIFAR100, tv.CIFAR100.base_folder),
                             lambda root, split: _finds(lambda: cifar.find_folder(root))),
    "mnist": _idx(MNIST, tv.MNIST),
    "fashion-mnist": _idx(FASHION_MNIST, tv.FashionMNIST),
    "svhn": Downloadable(svhn.SOURCE, _svhn, lambda root, split: (root / f"{split}_32x32.mat").is_file()),
    "stl10": Downloadable(stl10.SOURCE, _archive(tv.STL10, tv.STL10.base_folder),
                          lambda root, split: _finds(lambda: stl10.find_folder(root))),
    "tiny-imagenet": Downloadable(
        tiny_imagenet.SOURCE,
        lambda split: (Resource((TINY_IMAGENET_URL,), "tiny-imagenet-200.zip", TINY_IMAGENET_MD5,
                                "tiny-imagenet-200"),),
        lambda root, split: _finds(lambda: tiny_imagenet.find_folder(root))),
}


def _manual(resource: Resource, target: Path) -> str:
    """How to place `resource` by hand: the sentence every download error ends with."""
    into = f" (adakd unpacks it into {target.parent / resource.unpacks_into}/)" if resource.unpacks_into else ""
    return (f"Download {resource.urls[0]} (md5 {resource.md5}) where there is internet and copy it to {target}{into}; "
            f"or set data.mirror=URL (or {MIRROR_ENV}) to a server holding {resource.path} below that URL.")


def _download(resource: Resource, target: Path, mirror: str | None, say: Callable[[str], None] | None) -> None:
    """Fetch `resource` into `target`, trying each URL in turn; DownloadError when none works."""
    urls = resource.sources(mirror)
    for number, url in enumerate(urls, start=1):
        try:
            download(url, target, md5=resource.md5, manual=_manual(resource, target), say=say)
            return
        except DownloadError:
            if number == len(urls):
                raise
            (say or (lambda text: print(text, file=sys.stderr, flush=True)))(
                f"adakd: cannot download {url}; trying torchvision's next mirror, {urls[number]}")


def prepare(name: str, split: str, root: str | os.PathLike | None, *, download: bool, mirror: str | None = None,
            say: Callable[[str], None] | None = None) -> str | os.PathLike | Path | None:
    """The folder to load dataset `name` from, its `split` downloaded into it first when missing and `download`.

    Datasets that cannot be downloaded get `root` back unchanged. Without `download` nothing touches the network,
    but an archive already in place with its checksum (placed by hand) is still unpacked.
    """
    entry = DOWNLOADS.get(name)
    if entry is None:
        return root
    base = entry.source.resolve_root(root)
    if entry.present(base, split):
        return base  # files in place are used as they are: no network, no checksum
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    for resource in entry.resources(split):
        target = base / resource.path
        if resource.unpacks_into and (target.parent / resource.unpacks_into).is_dir():
            continue  # unpacked already (the loader words any file missing inside)
        if not resource.unpacks_into and target.is_file():
            continue  # a file in place is the loader's to judge
        if download:
            _download(resource, target, mirror, say)
        elif not matches(target, resource.md5):
            continue  # nothing to unpack; the loader says what is missing
        if resource.unpacks_into:
            unpack(target, target.parent, resource.unpacks_into)
    return base


def explain_missing(error: DatasetError, name: str, split: str, root: str | os.PathLike | None,
                    download: bool) -> DatasetError:
    """`error`, with the way to download the files added when they are missing because `download` was off."""
    entry = DOWNLOADS.get(name)
    if entry is None or download or entry.present(entry.source.resolve_root(root), split):
        return error
    return DatasetError(f"{error}; or let adakd download it (data.download=true, the default; download=True in "
                        f"load_dataset) from {entry.resources(split)[0].urls[0]}")
