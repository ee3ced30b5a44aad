"""Tiny datasets written in the real on-disk formats (the socket guard and no_data_env are in tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fake_data_files import cifar_split, write_jpeg, write_pickle


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """<tmp>/cifar-100-python/{train (20 images), test (10), meta}."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(folder / "train", cifar_split(20, 0))
    write_pickle(folder / "test", cifar_split(10, 1), protocol=4)
    write_pickle(folder / "meta", {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})
    return tmp_path


TINY_WNIDS = ["n02", "n01", "n03"]  # written unsorted: classes must come out sorted


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """<tmp>/tiny-imagenet-200 with 3 classes x 2 train JPEGs (one grayscale) and 4 val JPEGs."""
    folder = tmp_path / "tiny-imagenet-200"
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tshark\nn03\tray\nn99\tunused\n")
    for c, wnid in enumerate(TINY_WNIDS):
        for k in range(2):
            mode = "L" if (wnid, k) == ("n01", 1) else "RGB"
            write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (64, 64), 10 * c + k, mode)
    lines = []
    for k, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        write_jpeg(folder / "val" / "images" / f"val_{k}.JPEG", (64, 64), 100 + k)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t{k}\t40\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    """<tmp>/train/<wnid>/*.JPEG and <tmp>/val/<wnid>/*.JPEG, 2 classes, odd image sizes."""
    for split, per_class in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(["n01440764", "n01443537"]):
            for k in range(per_class):
                write_jpeg(tmp_path / split / wnid / f"{wnid}_{k}.JPEG", (48 + 8 * k, 40), 7 * c + k)
    return tmp_path
