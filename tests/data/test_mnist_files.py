"""MNIST and Fashion-MNIST from fake IDX files, plain and gzipped, in torchvision's layout and flat in root."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from adakd.data import ArrayDataset, DatasetError, dataset_info, load_dataset
from fake_data_files import idx_bytes, write_idx

IMAGES, LABELS = 0x803, 0x801


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 28, 28)).astype(np.uint8), rng.randint(0, 10, n).astype(np.uint8)


def write_set(folder: Path, gz: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four IDX files in `folder`: 12 train and 5 test images."""
    splits = {"train": fake_split(12, 0), "t10k": fake_split(5, 1)}
    for prefix, (images, labels) in splits.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, IMAGES, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, LABELS, gz)
    return splits


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_in_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    raw = write_set(tmp_path / "MNIST" / "raw", gz)
    train = load_dataset("mnist", "train", root=tmp_path)
    assert isinstance(train, ArrayDataset) and train.images.shape == (12, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    images, labels = raw["train"]
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))  # every pixel, row-major as the file stores it
    assert train.images[7, 0, 3, 20] == images[7, 3, 20]
    assert train.targets.tolist() == labels.tolist()
    assert train.classes[0] == "0 - zero" and train.classes[9] == "9 - nine" and train.num_classes == 10
    assert (train.mean, train.std, train.augment, train.crop_padding) == ((0.1307,), (0.3081,), "crop", 3)
    test = load_dataset("mnist", "test", root=tmp_path)
    assert len(test) == 5 and test.targets.tolist() == raw["t10k"][1].tolist() and test.augment == "none"
    image, target, index = test[2]
    assert image.shape == (1, 28, 28) and index == 2 and target == int(raw["t10k"][1][2])


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_files_directly_in_root(tmp_path: Path, gz: bool) -> None:
    raw = write_set(tmp_path, gz)
    train = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw["train"][0]))
    assert train.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"]
    assert (train.mean, train.std, train.augment) == ((0.2860,), (0.3530,), "crop_flip")


def test_fashion_mnist_in_its_own_folder_and_from_the_environment(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_set(tmp_path / "MNIST" / "raw", False)  # a different set beside it must not be picked up
    raw = write_set(tmp_path / "FashionMNIST" / "raw", True)
    (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(raw["t10k"][0][::-1].copy(), IMAGES)))
    monkeypatch.setenv("ADAKD_DATA", str(tmp_path))
    test = load_dataset("fashion-mnist", "test")
    assert torch.equal(test.images[:, 0], torch.from_numpy(raw["t10k"][0][::-1].copy()))


def test_image_size_resizes_once(tmp_path: Path) -> None:
    write_set(tmp_path, False)
    train = load_dataset("mnist", "train", root=tmp_path, image_size=32)
    assert train.images.shape == (12, 1, 32, 32) and train.crop_padding == 4
    assert train[0][0].shape == (1, 32, 32)
    assert dataset_info("mnist", image_size=32) == {"num_classes": 10, "image_size": 32, "channels": 1,
                                                    "mean": (0.1307,), "std": (0.3081,)}
    assert dataset_info("fashion-mnist")["image_size"] == 28


def test_missing_files_name_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"mnist: missing file train-images-idx3-ubyte \(or "
                                           r"train-images-idx3-ubyte.gz\)") as info:
        load_dataset("mnist", "train", root=tmp_path)
    message = str(info.value)
    assert "MNIST/raw/train-images-idx3-ubyte" in message and "ADAKD_DATA_MNIST" in message
    assert "\n" not in message
    with pytest.raises(DatasetError, match="ADAKD_DATA_FASHION_MNIST"):
        load_dataset("fashion-mnist", "train")


def test_wrong_magic_number(tmp_path: Path) -> None:
    write_set(tmp_path, False)
    images, _ = fake_split(12, 0)
    path = tmp_path / "train-images-idx3-ubyte"
    good = path.read_bytes()
    path.write_bytes(b"\x12\x34\x56\x78" + good[4:])
    with pytest.raises(DatasetError, match=r"mnist: train-images-idx3-ubyte has magic number 0x12345678, not "
                                           r"0x00000803 \(IDX images\)") as info:
        load_dataset("mnist", "train", root=tmp_path)
    assert str(path) in str(info.value)
    path.write_bytes(good)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(images, IMAGES))  # images where labels belong
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte has magic number 0x00000803, not 0x00000801"):
        load_dataset("mnist", "train", root=tmp_path)


def test_truncated_files(tmp_path: Path) -> None:
    write_set(tmp_path, False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte declares 5 x 28 x 28 = 3920 values but holds "
                                           r"3820 bytes.*truncated") as info:
        load_dataset("mnist", "test", root=tmp_path)
    assert str(path) in str(info.value)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short for an IDX header"):
        load_dataset("mnist", "test", root=tmp_path)


def test_truncated_gzip(tmp_path: Path) -> None:
    write_set(tmp_path, True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"mnist: cannot read train-images-idx3-ubyte.gz \(EOFError"):
        load_dataset("mnist", "train", root=tmp_path)


def test_label_count_differs_from_image_count(tmp_path: Path) -> None:
    write_set(tmp_path, False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), LABELS)
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte holds 11 labels but train-images-idx3-ubyte 12 "
                                           "images"):
        load_dataset("mnist", "train", root=tmp_path)


def test_wrong_image_size_and_label_range(tmp_path: Path) -> None:
    write_set(tmp_path, False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 32, 32), np.uint8), IMAGES)
    with pytest.raises(DatasetError, match="holds 32 x 32 images, not 28 x 28"):
        load_dataset("mnist", "test", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8), LABELS)
    with pytest.raises(DatasetError, match="holds label 10, outside 0..9"):
        load_dataset("mnist", "train", root=tmp_path)
