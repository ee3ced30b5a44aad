"""register_dataset: a user's own torch Dataset loaded through load_dataset, and each registration mistake."""
from __future__ import annotations

import pytest
import torch

import adakd.data as data
from adakd.data import (DATASETS, ArrayDataset, DatasetError, IndexedDataset, available, dataset_info,
                        load_dataset, make_loader, register_dataset)


@pytest.fixture(autouse=True)
def own_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations stay inside each test."""
    monkeypatch.setattr(data, "_MODULES", dict(data._MODULES))


class Squares(torch.utils.data.Dataset):
    """n items (image 1 x 4 x 4 filled with k, target k % 3), as a user would write one."""

    def __init__(self, n: int, *, with_index: bool = False, **attributes) -> None:
        self.n, self.with_index = n, with_index
        self.targets = [k % 3 for k in range(n)]
        self.classes = ["zero", "one", "two"]
        self.__dict__.update(attributes)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        item = (torch.full((1, 4, 4), float(k)), k % 3)
        return (*item, 1000 + k) if self.with_index else item


def squares(split: str, root=None, *, n: int = 7, **attributes) -> Squares:
    return Squares(n if split == "train" else 4, **attributes)


def test_a_users_dataset_of_image_target_items() -> None:
    register_dataset("squares", squares, info={"num_classes": 3, "channels": 1})
    assert "squares" in available() and available()[:len(DATASETS)] == list(DATASETS)
    assert "squares" not in DATASETS  # the built-in names stay as they were
    train = load_dataset("squares", "train", n=6)
    assert isinstance(train, IndexedDataset) and len(train) == 6
    assert train.targets.tolist() == [0, 1, 2, 0, 1, 2] and train.targets.dtype == torch.int64
    assert train.num_classes == 3 and train.classes == ["zero", "one", "two"]
    image, target, index = train[4]
    assert torch.equal(image, torch.full((1, 4, 4), 4.0)) and (target, index) == (1, 4)
    assert train[0][0].shape == (1, 4, 4)  # what the engine reads for the input shape
    loader = make_loader(train, 4, train=True, device=torch.device("cpu"), seed=1, num_workers=0)
    seen = torch.cat([ids for _, _, ids in loader])
    assert sorted(seen.tolist()) == list(range(6))
    images, targets, ids = next(iter(loader))
    assert torch.equal(images[:, 0, 0, 0], ids.float()) and torch.equal(targets, ids % 3)
    assert len(load_dataset("squares", "test")) == 4
    assert dataset_info("squares") == {"num_classes": 3, "image_size": None, "channels": 1, "mean": None,
                                       "std": None}


def test_items_with_an_index_and_info_as_a_callable() -> None:
    register_dataset("indexed", lambda split, root=None, **o: Squares(5, with_index=True, num_classes=4),
                     info=lambda image_size=4, **_: {"num_classes": 4, "image_size": image_size})
    ds = load_dataset("indexed", "train")
    assert ds.num_classes == 4 and ds.classes == ["zero", "one", "two"]  # .num_classes wins over len(.classes)
    assert ds[3][1:] == (0, 3)  # the index is the position, not the dataset's own 1003
    assert dataset_info("indexed", image_size=9)["image_size"] == 9
    assert dataset_info("indexed")["channels"] is None


def test_array_datasets_pass_through_and_labels_are_read() -> None:
    own = ArrayDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), classes=["a", "b"],
                       mean=(0.5,) * 3, std=(0.2,) * 3)
    register_dataset("arrays", lambda split, root=None: own)
    assert load_dataset("arrays", "train") is own
    register_dataset("labelled", lambda split, root=None: Squares(3, targets=None, labels=[0, 1, 2]))
    assert load_dataset("labelled", "test").targets.tolist() == [0, 1, 2]  # torchvision's SVHN and STL10 say labels


def test_registration_mistakes() -> None:
    with pytest.raises(DatasetError, match=r"register_dataset: 'mnist' is a built-in dataset; pick another name"):
        register_dataset("mnist", squares)
    register_dataset("squares", squares)
    with pytest.raises(DatasetError, match="'squares' is already registered"):
        register_dataset("squares", squares)
    with pytest.raises(DatasetError, match=r"register_dataset\('cubes'\): load must be a callable "
                                           r"load\(split, root, \*\*options\), got Squares"):
        register_dataset("cubes", Squares(3))
    with pytest.raises(DatasetError, match=r"load cannot be called as load\(split, root\)"):
        register_dataset("cubes", lambda split: Squares(3))
    with pytest.raises(DatasetError, match="the name must be a non-empty string"):
        register_dataset("", squares)
    with pytest.raises(DatasetError, match="info must be a dict, a callable returning one, or None, got list"):
        register_dataset("cubes", squares, info=[3])
    assert "cubes" not in available()


def test_unknown_names_suggest_registered_ones() -> None:
    register_dataset("my-flowers", squares)
    with pytest.raises(DatasetError, match=r"unknown dataset 'my-flower'; choose one of cifar100, .*, folder, "
                                           r"my-flowers; did you mean my-flowers\?"):
        load_dataset("my-flower", "train")
    with pytest.raises(DatasetError, match="did you mean mnist"):
        dataset_info("mnsit")


@pytest.mark.parametrize("attributes, message", [
    ({"targets": None}, r"has no .targets \(nor .labels\).*must provide items \(image tensor C x H x W, int "
                        r"target\)"),
    ({"targets": ["a", "b", "c", "d", "e", "f", "g"]}, "is not a sequence of ints"),
    ({"targets": [0, 1]}, ".targets has 2 entries but the dataset 7 items"),
    ({"classes": None}, "has neither .num_classes nor .classes"),
    ({"classes": ["zero", "one"]}, r"targets lie in \[0, 2\], outside \[0, 2\) for its 2 classes"),
    ({"targets": [1, 1, 2, 0, 1, 2, 0]}, r"item 0's target is 0 but .targets\[0\] is 1"),
])
def test_what_a_registered_dataset_must_provide(attributes: dict, message: str) -> None:
    register_dataset("broken", lambda split, root=None: Squares(7, **attributes))
    with pytest.raises(DatasetError, match=r"^broken: .*" + message):
        load_dataset("broken", "train")


class PilItems(Squares):
    def __getitem__(self, k: int):
        from PIL import Image

        return Image.new("RGB", (4, 4)), k % 3


class BareImages(Squares):
    def __getitem__(self, k: int):
        return torch.zeros(1, 4, 4)


def test_items_must_be_tensors_and_the_loader_must_return_a_dataset() -> None:
    register_dataset("pil", lambda split, root=None: PilItems(3))
    with pytest.raises(DatasetError, match=r"item 0's image is Image, not a C x H x W tensor \(add "
                                           r"transforms.ToTensor\(\)"):
        load_dataset("pil", "train")
    register_dataset("nothing", lambda split, root=None: None)
    with pytest.raises(DatasetError, match="nothing: the loader returned NoneType, not a dataset"):
        load_dataset("nothing", "train")
    register_dataset("bare", lambda split, root=None: BareImages(2))
    with pytest.raises(DatasetError, match=r"bare: item 0 is a Tensor, not a tuple \(image, target\)"):
        load_dataset("bare", "train")
    register_dataset("flat", lambda split, root=None: [torch.zeros(3)] * 2)
    with pytest.raises(DatasetError, match="flat: the dataset has no .targets"):
        load_dataset("flat", "train")
