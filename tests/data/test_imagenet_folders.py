"""ImageNet from fake train/ and val/ class folders: items, the folder loader and each error case."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adakd.data import DatasetError, dataset_info, load_dataset, make_loader


def test_items_are_image_target_index(imagenet_root: Path) -> None:
    train = load_dataset("imagenet", "train", root=imagenet_root)
    assert len(train) == 6 and train.classes == ["n01440764", "n01443537"] and train.num_classes == 2
    image, target, index = train[4]
    assert image.shape == (3, 224, 224) and target == 1 and index == 4
    test = load_dataset("imagenet", "test", root=imagenet_root)
    assert len(test) == 4 and test.targets.tolist() == [0, 0, 1, 1]
    assert dataset_info("imagenet")["num_classes"] == 1000


def test_folder_loader_order(imagenet_root: Path) -> None:
    train = load_dataset("imagenet", "train", root=imagenet_root)
    loader = make_loader(train, 4, train=True, device=torch.device("cpu"), seed=3, num_workers=0)
    assert len(loader) == 2
    epoch0 = torch.cat([index for _, _, index in loader])
    assert sorted(epoch0.tolist()) == list(range(6))
    assert torch.equal(epoch0, torch.cat([index for _, _, index in loader]))  # same epoch replays
    loader.set_epoch(1)
    images, targets, index = next(iter(loader))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert torch.equal(targets, train.targets[index])
    ranks = [make_loader(train, 2, train=True, device="cpu", world_size=2, rank=r, num_workers=0) for r in (0, 1)]
    assert sorted(torch.cat([i for loader in ranks for _, _, i in loader]).tolist()) == list(range(6))
    test = make_loader(load_dataset("imagenet", "test", root=imagenet_root), 3, train=False, device="cpu",
                       num_workers=0)
    assert torch.cat([index for _, _, index in test]).tolist() == [0, 1, 2, 3]


def test_root_under_adakd_data(imagenet_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAKD_DATA", str(imagenet_root.parent))
    with pytest.raises(DatasetError, match="missing folder train/") as info:
        load_dataset("imagenet", "train")
    assert str(imagenet_root.parent / "imagenet") in str(info.value)
    monkeypatch.setenv("ADAKD_DATA_IMAGENET", str(imagenet_root))
    assert len(load_dataset("imagenet", "train")) == 6


def test_missing_val(imagenet_root: Path) -> None:
    shutil.rmtree(imagenet_root / "val")
    with pytest.raises(DatasetError, match="missing folder val/") as info:
        load_dataset("imagenet", "train", root=imagenet_root)
    assert "ADAKD_DATA_IMAGENET" in str(info.value) and "<root>/val/<wnid>/*.JPEG" in str(info.value)


def test_class_folders_differ(imagenet_root: Path) -> None:
    (imagenet_root / "val" / "n01443537").rename(imagenet_root / "val" / "n09999999")
    with pytest.raises(DatasetError, match=r"only in train: \['n01443537'\], only in val: \['n09999999'\]"):
        load_dataset("imagenet", "test", root=imagenet_root)


def test_empty_class_folder(imagenet_root: Path) -> None:
    for path in (imagenet_root / "train" / "n01443537").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="class folder has no images.*n01443537"):
        load_dataset("imagenet", "train", root=imagenet_root)
