"""Tiny-ImageNet from a fake tiny-imagenet-200 tree: decoding, labels, options and each error case."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adakd.data import DatasetError, load_dataset
from fake_data_files import write_jpeg


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_train_split(tiny_root: Path) -> None:
    ds = load_dataset("tiny-imagenet", "train", root=tiny_root)
    folder = tiny_root / "tiny-imagenet-200"
    assert ds.images.shape == (6, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.classes == ["goldfish", "shark", "ray"]  # sorted wnids n01, n02, n03; names from words.txt
    assert ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(ds.images[3], _pixels(folder / "train" / "n02" / "images" / "n02_1.JPEG"))
    gray = ds.images[1]  # n01_1 was written grayscale: three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert ds.augment == "flip" and ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)
    assert load_dataset("tiny-imagenet", "train", root=folder, tiny_aug="crop").augment == "crop_flip"


def test_test_split_is_val(tiny_root: Path) -> None:
    ds = load_dataset("tiny-imagenet", "test", root=tiny_root)
    assert ds.targets.tolist() == [2, 0, 1, 0] and ds.augment == "none"
    assert torch.equal(ds.images[2], _pixels(tiny_root / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"))


def test_words_txt_is_optional(tiny_root: Path) -> None:
    (tiny_root / "tiny-imagenet-200" / "words.txt").unlink()
    assert load_dataset("tiny-imagenet", "test", root=tiny_root).classes == ["n01", "n02", "n03"]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no tiny-imagenet-200 folder") as info:
        load_dataset("tiny-imagenet", "train", root=tmp_path)
    assert "wnids.txt" in str(info.value) and "ADAKD_DATA_TINY_IMAGENET" in str(info.value)


def test_empty_class_folder(tiny_root: Path) -> None:
    for path in (tiny_root / "tiny-imagenet-200" / "train" / "n03" / "images").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="class folder n03 has no JPEG images") as info:
        load_dataset("tiny-imagenet", "train", root=tiny_root)
    assert str(Path("train") / "n03" / "images") in str(info.value)


@pytest.mark.parametrize("line", ["val_0.JPEG n03 0 0 40 63", "val_0.JPEG\tn77\t0\t0\t40\t63",
                                  "val_0.JPEG\tn03\t0\tx\t40\t63", "val_0.JPEG\tn03"])
def test_malformed_val_annotations(tiny_root: Path, line: str) -> None:
    annotations = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + line + "\n")
    with pytest.raises(DatasetError, match="val_annotations.txt line 5 is malformed"):
        load_dataset("tiny-imagenet", "test", root=tiny_root)


def test_missing_annotations_and_images(tiny_root: Path) -> None:
    val = tiny_root / "tiny-imagenet-200" / "val"
    (val / "images" / "val_3.JPEG").unlink()
    with pytest.raises(DatasetError, match="cannot decode val_3.JPEG"):
        load_dataset("tiny-imagenet", "test", root=tiny_root)
    (val / "val_annotations.txt").unlink()
    with pytest.raises(DatasetError, match="missing val/val_annotations.txt"):
        load_dataset("tiny-imagenet", "test", root=tiny_root)


def test_corrupt_and_wrong_size_jpeg(tiny_root: Path) -> None:
    images = tiny_root / "tiny-imagenet-200" / "train" / "n02" / "images"
    (images / "n02_0.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DatasetError, match="cannot decode n02_0.JPEG") as info:
        load_dataset("tiny-imagenet", "train", root=tiny_root)
    assert info.value.__cause__ is None
    write_jpeg(images / "n02_0.JPEG", (32, 64), 0)
    with pytest.raises(DatasetError, match="n02_0.JPEG is 32x64, not 64x64"):
        load_dataset("tiny-imagenet", "train", root=tiny_root)


def test_bad_option(tiny_root: Path) -> None:
    with pytest.raises(DatasetError, match="tiny_aug"):
        load_dataset("tiny-imagenet", "train", root=tiny_root, tiny_aug="mixup")
