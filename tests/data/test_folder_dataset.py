"""Your own ImageFolder tree: 3 classes of PNGs, held in memory or streamed, the size rule and each bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from adakd.data import ArrayDataset, DatasetError, FolderDataset, dataset_info, folder, load_dataset, make_loader
from fake_data_files import write_png

CLASSES = ["ant", "bee", "cat"]


def pixels(seed: int, size: tuple[int, int] = (32, 32), gray: bool = False) -> np.ndarray:
    """Random uint8 pixels, height x width (x 3 unless gray)."""
    shape = size if gray else (*size, 3)
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """train/: 3 PNGs per class (bee/b2 is grayscale, cat/c1 is 40 x 24), val/: 2 per class, all 32 x 32 otherwise."""
    for split, count in (("train", 3), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for k in range(count):
                seed = 100 * (split == "val") + 10 * c + k
                if (split, name, k) == ("train", "bee", 2):
                    image = pixels(seed, gray=True)
                elif (split, name, k) == ("train", "cat", 1):
                    image = pixels(seed, (24, 40))
                else:
                    image = pixels(seed)
                write_png(tmp_path / split / name / f"{name[0]}{k}.png", image)
    return tmp_path


def test_small_tree_is_held_in_memory_with_exact_pixels_and_statistics(tree: Path) -> None:
    train = load_dataset("folder", "train", root=tree)
    assert isinstance(train, ArrayDataset) and train.images.shape == (9, 3, 32, 32)
    assert train.classes == CLASSES and train.num_classes == 3
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted classes, files sorted within each
    # ant/a1.png is RGB 32 x 32: kept exactly, H x W x C -> C x H x W.
    assert torch.equal(train.images[1], torch.from_numpy(pixels(1)).permute(2, 0, 1))
    assert train.images[1, 2, 5, 30] == pixels(1)[5, 30, 2]
    gray = torch.from_numpy(pixels(12, gray=True))  # bee/b2.png: grayscale, repeated into R, G and B
    assert all(torch.equal(train.images[5, c], gray) for c in range(3))
    # cat/c1.png is 40 wide, 24 high: centre-cropped to 24 x 24 and resized to 32 x 32 (PIL bilinear).
    with Image.open(tree / "train" / "cat" / "c1.png") as image:
        fitted = np.array(image.crop((8, 0, 32, 24)).resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(train.images[7], torch.from_numpy(fitted).permute(2, 0, 1))
    # Mean and std: exactly those of the held training images, per channel, in 0..1 units.
    held = train.images.double() / 255
    assert np.allclose(train.mean, held.mean(dim=(0, 2, 3)), atol=1e-12, rtol=0)
    assert np.allclose(train.std, held.std(dim=(0, 2, 3), unbiased=False), atol=1e-12, rtol=0)
    assert (train.augment, train.crop_padding) == ("crop_flip", 4)
    image, target, index = train[3]
    assert index == 3 and target == 1
    assert torch.allclose(image[0, 0, 0], (train.images[3, 0, 0, 0] / 255 - train.mean[0]) / train.std[0])

    test = load_dataset("folder", "test", root=tree)  # the statistics of train, not of val
    assert test.images.shape == (6, 3, 32, 32) and test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert (test.mean, test.std, test.augment) == (train.mean, train.std, "none")
    assert torch.equal(test.images[3], torch.from_numpy(pixels(111)).permute(2, 0, 1))  # val/bee/b1.png

    batch, targets, ids = next(iter(make_loader(train, 4, train=True, device=torch.device("cpu"))))
    assert batch.shape == (4, 3, 32, 32) and torch.equal(targets, train.targets[ids])


def test_image_size_and_test_folder(tree: Path) -> None:
    (tree / "val").rename(tree / "test")  # test/ is accepted when there is no val/
    train = load_dataset("folder", "train", root=tree, image_size=16)
    assert train.images.shape == (9, 3, 16, 16) and train.crop_padding == 2
    assert len(load_dataset("folder", "test", root=tree, image_size=16)) == 6


def test_large_tree_streams_with_sampled_statistics(tree: Path) -> None:
    train = load_dataset("folder", "train", root=tree, in_memory=False)
    assert isinstance(train, FolderDataset) and len(train) == 9 and train.classes == CLASSES
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and train.augment == "random_resized_crop_flip"
    image, target, index = train[5]
    assert image.shape == (3, 224, 224) and (target, index) == (1, 5)
    # With 9 < STATS_SAMPLE images the sample is every training image, seen at the test geometry.
    geometry = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    seen = []
    for path in sorted((tree / "train").glob("*/*.png")):
        with Image.open(path) as im:
            seen.append(geometry(im.convert("RGB")).double() / 255)
    seen = torch.stack(seen)
    assert np.allclose(train.mean, seen.mean(dim=(0, 2, 3)), atol=1e-9, rtol=0)
    assert np.allclose(train.std, seen.std(dim=(0, 2, 3), unbiased=False), atol=1e-9, rtol=0)

    test = load_dataset("folder", "test", root=tree, in_memory=False, image_size=64)
    assert (test.mean, test.std) != (train.mean, train.std)  # measured at its own size
    image, target, index = test[4]
    assert image.shape == (3, 64, 64) and (target, index) == (2, 4) and test.augment == "none"
    with Image.open(tree / "val" / "cat" / "c0.png") as im:
        expected = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(64), transforms.ToTensor(),
                                       transforms.Normalize(test.mean, test.std)])(im.convert("RGB"))
    assert torch.allclose(image, expected)
    loader = make_loader(test, 4, train=False, device=torch.device("cpu"), num_workers=0)
    assert [tuple(b[0].shape) for b in loader] == [(4, 3, 64, 64), (2, 3, 64, 64)]


def test_size_rule(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert folder.holds_in_memory(699_050, None) and not folder.holds_in_memory(699_051, None)  # 2 GiB at 32 px
    assert not folder.holds_in_memory(20_000, 224)
    monkeypatch.setattr(folder, "IN_MEMORY_BYTES", 9 * 16 * 16 * 3)
    assert isinstance(load_dataset("folder", "train", root=tree, image_size=16), ArrayDataset)
    assert isinstance(load_dataset("folder", "test", root=tree, image_size=17), FolderDataset)  # by train's count
    assert isinstance(load_dataset("folder", "train", root=tree, image_size=17, in_memory=True), ArrayDataset)
    assert dataset_info("folder") == {"num_classes": None, "image_size": None, "channels": 3, "mean": None,
                                      "std": None}
    assert dataset_info("folder", in_memory=False)["image_size"] == 224
    assert dataset_info("folder", image_size=48)["image_size"] == 48


def test_hidden_files_and_folders_are_skipped(tree: Path) -> None:
    (tree / "train" / "ant" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tree / "train" / ".ipynb_checkpoints").mkdir()
    (tree / "val" / ".ipynb_checkpoints").mkdir()
    assert load_dataset("folder", "train", root=tree).classes == CLASSES


def test_missing_and_empty_folders(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match=r"folder: missing folder train/ .*ADAKD_DATA_FOLDER"):
        load_dataset("folder", "train", root=tree / "nowhere")
    monkeypatch.setenv("ADAKD_DATA", str(tree))  # looked for in $ADAKD_DATA/folder
    with pytest.raises(DatasetError, match="missing folder train/") as info:
        load_dataset("folder", "train")
    assert str(tree / "folder" / "train") in str(info.value)
    monkeypatch.setenv("ADAKD_DATA_FOLDER", str(tree))
    assert len(load_dataset("folder", "test")) == 6
    for path in (tree / "train" / "bee").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="folder: class folder train/bee has no images"):
        load_dataset("folder", "train")
    shutil.rmtree(tree / "val")
    with pytest.raises(DatasetError, match=r"missing folder val/ \(or test/\)"):
        load_dataset("folder", "train")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    write_png(tmp_path / "train" / "loose.png", pixels(0))
    with pytest.raises(DatasetError, match="folder: train/ has no class folders"):
        load_dataset("folder", "train", root=tmp_path)


def test_class_folder_missing_from_val(tree: Path) -> None:
    shutil.rmtree(tree / "val" / "cat")
    write_png(tree / "val" / "dog" / "d0.png", pixels(0))
    with pytest.raises(DatasetError, match=r"train/ and val/ must hold the same class folders; only in train/: "
                                           r"\['cat'\], only in val/: \['dog'\]") as info:
        load_dataset("folder", "test", root=tree)
    assert "\n" not in str(info.value)


def test_non_image_file(tree: Path) -> None:
    (tree / "val" / "ant" / "notes.txt").write_text("labels checked by hand\n")
    with pytest.raises(DatasetError, match=r"folder: val/ant/notes.txt is not an image file") as info:
        load_dataset("folder", "test", root=tree)
    assert str(tree / "val" / "ant" / "notes.txt") in str(info.value)
    (tree / "train" / "cat" / "sub").mkdir()
    (tree / "train" / "cat" / "sub" / "c9.jpg.bak").write_bytes(b"old")
    with pytest.raises(DatasetError, match="train/cat/sub/c9.jpg.bak is not an image file"):  # streamed sets too
        load_dataset("folder", "train", root=tree, in_memory=False)


def test_corrupt_image(tree: Path) -> None:
    (tree / "train" / "bee" / "b1.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"folder: cannot decode bee/b1.png \(UnidentifiedImageError"):
        load_dataset("folder", "train", root=tree)
    with pytest.raises(DatasetError, match="cannot decode bee/b1.png"):  # the statistics decode train too
        load_dataset("folder", "test", root=tree)
    (tree / "train" / "bee" / "b1.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot decode bee/b1.png"):
        load_dataset("folder", "train", root=tree, in_memory=False)


def test_bad_options(tree: Path) -> None:
    with pytest.raises(DatasetError, match="option in_memory must be true, false or null"):
        load_dataset("folder", "train", root=tree, in_memory="yes")
    with pytest.raises(DatasetError, match="option image_size must be a positive int, got 0"):
        load_dataset("folder", "train", root=tree, image_size=0)


def test_symlink_loop_is_one_line_naming_the_link(tree: Path) -> None:
    (tree / "train" / "bee" / "again").symlink_to("..")  # train/bee/again -> train/: train/bee/again/bee/again/...
    with pytest.raises(DatasetError, match=r"^folder: symlink loop: train/bee/again -> \.\. leads back") as info:
        load_dataset("folder", "train", root=tree)
    assert "again/bee" not in str(info.value) and "\n" not in str(info.value)
    (tree / "train" / "bee" / "again").unlink()
    # Two folders whose links point at each other loop too; the link that turns back is named.
    (tree / "val" / "cat" / "x").mkdir()
    (tree / "val" / "cat" / "y").mkdir()
    (tree / "val" / "cat" / "x" / "to_y").symlink_to("../y")
    (tree / "val" / "cat" / "y" / "to_x").symlink_to("../x")
    with pytest.raises(DatasetError, match=r"symlink loop: val/cat/x/to_y/to_x -> \.\./x leads back"):
        load_dataset("folder", "test", root=tree)


def test_a_link_to_a_folder_outside_is_followed(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    extra = tmp_path_factory.mktemp("extra")
    write_png(extra / "more.png", pixels(7))
    (tree / "train" / "ant" / "linked").symlink_to(extra)
    train = load_dataset("folder", "train", root=tree)
    assert len(train) == 10 and torch.equal(train.images[3], torch.from_numpy(pixels(7)).permute(2, 0, 1))


def test_animated_gif_gives_its_first_frame(tree: Path) -> None:
    frames = [Image.fromarray(pixels(50 + k)).quantize(colors=256) for k in range(3)]
    path = tree / "train" / "cat" / "c3.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as image:
        assert image.n_frames == 3
    train = load_dataset("folder", "train", root=tree)
    assert len(train) == 10 and train.targets.tolist()[-4:] == [2, 2, 2, 2]
    first = np.array(frames[0].convert("RGB"))  # the palette image as saved: what frame 0 decodes to
    assert torch.equal(train.images[9], torch.from_numpy(first).permute(2, 0, 1))  # c3.gif sorts after c2.png
    streamed = load_dataset("folder", "train", root=tree, in_memory=False)
    assert streamed[9][0].shape == (3, 224, 224)


def test_16_bit_grayscale_is_scaled_not_clipped_with_one_warning(tree: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(folder, "_WARNED_WIDE", [], raising=False)
    wide = np.zeros((32, 32), dtype=np.uint16)
    wide[0, :6] = [0, 128, 129, 257, 1000, 65535]  # round(v / 257): 0, 0, 1, 1, 4, 255
    wide[1:] = 32896  # 128 * 257
    for name in ("a3", "a4"):
        Image.fromarray(wide).save(tree / "train" / "ant" / f"{name}.png")
    with Image.open(tree / "train" / "ant" / "a3.png") as image:
        assert image.mode == "I;16" and np.asarray(image.convert("L"))[0, 4] == 255  # what PIL alone gives
    train = load_dataset("folder", "train", root=tree)
    for index in (3, 4):
        assert train.images[index, :, 0, :6].tolist() == [[0, 0, 1, 1, 4, 255]] * 3
        assert bool((train.images[index, :, 1:] == 128).all())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "16-bit" in line]
    assert warnings == ["adakd: warning: folder: ant/a3.png is 16-bit grayscale (PIL mode I;16); 16-bit images are "
                        "scaled to 8 bits (value / 257) as they are read"]
    load_dataset("folder", "test", root=tree)  # decodes train again for the statistics: no second warning
    assert "16-bit" not in capsys.readouterr().err
