"""SVHN from fake .mat files (scipy.io.savemat) and STL-10 from fake binaries whose pixels encode their position."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from adakd.data import ArrayDataset, DatasetError, dataset_info, load_dataset


def write_svhn(root: Path, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A {split}_32x32.mat as torchvision's SVHN reads it: X is 32 x 32 x 3 x N uint8, y is N x 1 in 1..10."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = np.arange(1, n + 1).reshape(n, 1) % 10 + 1  # 1..10, 10 included
    root.mkdir(parents=True, exist_ok=True)
    savemat(root / f"{split}_32x32.mat", {"X": x, "y": y.astype(np.uint8)})
    return x, y


def test_svhn_pixels_and_labels(tmp_path: Path) -> None:
    x, y = write_svhn(tmp_path, "train", 12, 0)
    train = load_dataset("svhn", "train", root=tmp_path)
    assert isinstance(train, ArrayDataset) and train.images.shape == (12, 3, 32, 32)
    # X[row, column, channel, image] is pixel (channel, row, column) of that image.
    assert train.images[5, 2, 3, 17] == x[3, 17, 2, 5] and train.images[5, 0, 17, 3] == x[17, 3, 0, 5]
    assert torch.equal(train.images, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert train.targets.tolist() == [int(v) % 10 for v in y[:, 0]] and 0 in train.targets.tolist()
    assert train.targets[8] == 0 and y[8, 0] == 10  # label 10 is the digit 0
    assert train.classes == [str(d) for d in range(10)] and (train.augment, train.crop_padding) == ("crop", 4)
    write_svhn(tmp_path, "test", 4, 1)
    test = load_dataset("svhn", "test", root=tmp_path, image_size=16)
    assert test.images.shape == (4, 3, 16, 16) and test.augment == "none"
    assert dataset_info("svhn")["image_size"] == 32 and dataset_info("svhn", image_size=16)["image_size"] == 16


def test_svhn_under_adakd_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_svhn(tmp_path / "svhn", "test", 3, 2)
    monkeypatch.setenv("ADAKD_DATA", str(tmp_path))
    assert len(load_dataset("svhn", "test")) == 3


def test_svhn_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"svhn: missing file train_32x32.mat .*ADAKD_DATA_SVHN"):
        load_dataset("svhn", "train", root=tmp_path)
    write_svhn(tmp_path, "train", 12, 0)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"svhn: cannot read train_32x32.mat as a MATLAB file .*truncated or "
                                           r"corrupt") as info:
        load_dataset("svhn", "train", root=tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(DatasetError, match="train_32x32.mat has no variable 'y'"):
        load_dataset("svhn", "train", root=tmp_path)
    savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1), np.uint8)})
    with pytest.raises(DatasetError, match="holds 4 images but 3 labels"):
        load_dataset("svhn", "train", root=tmp_path)
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]], np.uint8)})
    with pytest.raises(DatasetError, match=r"labels lie in \[0, 3\], not 1..10"):
        load_dataset("svhn", "train", root=tmp_path)


def stl10_images(n: int) -> np.ndarray:
    """N x 3 x 96 x 96 (C x H x W) with pixel (c, y, x) of image i = (i + 50 c + 2 y + 3 x) mod 256: position coded."""
    i, c, y, x = np.ogrid[:n, :3, :96, :96]
    return ((i + 50 * c + 2 * y + 3 * x) % 256).astype(np.uint8)


def write_stl10(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """{split}_X.bin stores each channel column-major (channel, then column, then row); {split}_y.bin 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
    labels.astype(np.uint8).tofile(folder / f"{split}_y.bin")


def test_stl10_column_major_pixels_and_labels(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    images = stl10_images(4)
    write_stl10(folder, "train", images, np.array([1, 10, 3, 7]))
    (folder / "class_names.txt").write_text("\n".join(f"name_{k}" for k in range(10)) + "\n")
    raw = np.fromfile(folder / "train_X.bin", dtype=np.uint8)
    train = load_dataset("stl10", "train", root=tmp_path)
    assert train.images.shape == (4, 3, 96, 96) and torch.equal(train.images, torch.from_numpy(images))
    # Byte c * 9216 + x * 96 + y of an image is its pixel at row y, column x: row 1, column 0 differs from row 0,
    # column 1, so a missing or wrong transpose fails here.
    assert train.images[2, 1, 1, 0] == raw[2 * 27648 + 1 * 9216 + 0 * 96 + 1] == (2 + 50 + 2) % 256
    assert train.images[2, 1, 0, 1] == raw[2 * 27648 + 1 * 9216 + 1 * 96 + 0] == (2 + 50 + 3) % 256
    assert train.images[3, 2, 95, 10] == (3 + 100 + 190 + 30) % 256
    assert train.targets.tolist() == [0, 9, 2, 6] and train.classes[9] == "name_9"
    assert (train.augment, train.crop_padding) == ("crop_flip", 12)


def test_stl10_without_class_names_and_resized(tmp_path: Path) -> None:
    write_stl10(tmp_path, "test", stl10_images(2), np.array([2, 5]))  # the files directly in root
    test = load_dataset("stl10", "test", root=tmp_path, image_size=32)
    assert test.images.shape == (2, 3, 32, 32) and test.augment == "none"
    assert test.classes == ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    assert test.targets.tolist() == [1, 4]
    info = dataset_info("stl10")
    assert (info["num_classes"], info["image_size"], info["channels"]) == (10, 96, 3)


def test_stl10_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"stl10: no stl10_binary folder with train_X.bin .*ADAKD_DATA_STL10"):
        load_dataset("stl10", "train", root=tmp_path)
    folder = tmp_path / "stl10_binary"
    write_stl10(folder, "train", stl10_images(3), np.array([1, 2, 3]))
    path = folder / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"train_X.bin is 82939 bytes, not a multiple of 3 x 96 x 96 = 27648; "
                                           r"the file is truncated") as info:
        load_dataset("stl10", "train", root=tmp_path)
    assert str(path) in str(info.value)
    write_stl10(folder, "train", stl10_images(3), np.array([1, 2]))
    with pytest.raises(DatasetError, match="train_y.bin holds 2 labels but train_X.bin 3 images"):
        load_dataset("stl10", "train", root=tmp_path)
    write_stl10(folder, "train", stl10_images(2), np.array([0, 2]))
    with pytest.raises(DatasetError, match=r"labels lie in \[0, 2\], not 1..10"):
        load_dataset("stl10", "train", root=tmp_path)
    write_stl10(folder, "train", stl10_images(2), np.array([1, 2]))
    (folder / "class_names.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match="class_names.txt lists 2 names, not 10"):
        load_dataset("stl10", "train", root=tmp_path)
    with pytest.raises(DatasetError, match="missing file test_X.bin"):
        load_dataset("stl10", "test", root=tmp_path)
