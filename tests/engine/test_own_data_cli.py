"""Your own models and data, badly given, through the `adakd` command: one line, exit 2, no run folder left.

Each case runs `adakd.cli.main` in-process as `adakd train` / `adakd distill` would be typed, on fake files written
here (nothing downloads): an unknown timm name, a registered model the automatic staged view cannot cut, image
folders without images or with a class missing from val/, and corrupt MNIST / Fashion-MNIST IDX files.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data.fake_data_files import idx_bytes, write_idx, write_png  # tests/data, through the rootdir on sys.path
from engine.test_bad_input import fails as one_error_line
from models.test_external import _CrossingSkip, _DataDependent, _Plain  # the same user models

from adakd import models
from adakd.cli import main
from adakd.models.registry import MODELS
from tiny_run import save_random_teacher

QUICK = ["log.progress=false", "log.tensorboard=false", "data.batch_size=8", "data.num_workers=0",
         "optim.milestones=[]", "epochs=1"]
IMAGES, LABELS = 0x803, 0x801


def fails(capsys, argv: list[str], out_dir: Path, *phrases: str) -> str:
    """Run the CLI; assert one 'adakd: error:' line holding every phrase, exit 2, and no run folder under out_dir."""
    line = one_error_line(capsys, argv, *phrases)
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.rglob("*"))
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resnet8_weights(path: Path, num_classes: int) -> Path:
    return save_random_teacher(path, num_classes=num_classes)


# ------------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("command", ["train", "distill"])
def test_unknown_timm_name(tmp_path, capsys, command):
    out = tmp_path / "runs"
    argv = [command, "dataset=synthetic", "data.train_size=32", *QUICK, "model.name=timm:resnet_nope",
            f"out_dir={out}", "name=run"]
    if command == "distill":
        argv += ["teacher.name=resnet8", f"teacher.weights={resnet8_weights(tmp_path / 't.pth', 10)}", "method=kd"]
    line = fails(capsys, argv, out, "unknown timm model 'resnet_nope'", "available('*', source='timm')")
    assert "Did you mean 'timm:" in line  # close real names are offered


@pytest.fixture
def own_models(monkeypatch):
    """Registers the user's models `plain_net`, `skip_across`, `data_dependent` for one test."""
    monkeypatch.setattr(MODELS, "_builders", dict(MODELS._builders))
    for name, cls in (("plain_net", _Plain), ("skip_across", _CrossingSkip), ("data_dependent", _DataDependent)):
        models.register_model(lambda num_classes=10, cls=cls, **_: cls(num_classes), name=name)


@pytest.mark.parametrize(("name", "cls", "reason"), [
    ("skip_across", _CrossingSkip, "cannot be cut after its block 'layer1.0': 2 values cross"),
    ("data_dependent", _DataDependent, "torch.fx cannot trace its forward"),
], ids=["skip_across", "data_dependent"])
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_unsplittable_model(tmp_path, capsys, own_models, name, cls, reason, role):
    out = tmp_path / "runs"
    common = ["dataset=synthetic", "data.train_size=32", *QUICK, f"out_dir={out}", "name=run"]
    if role == "student":
        argv = ["train", *common, f"model.name={name}"]
    else:  # the teacher's weights are a file of its own architecture: only the cut can fail
        weights = tmp_path / "teacher.pth"
        torch.save({"model": cls(10).state_dict()}, weights)
        argv = ["distill", *common, "model.name=plain_net", f"teacher.name={name}", f"teacher.weights={weights}",
                "method=kd"]
    fails(capsys, argv, out, reason, f"@adakd.models.register_layout({cls.__name__})")


def test_a_registered_model_that_can_be_cut_trains(tmp_path, own_models):
    """The control for the unsplittable models: the same registration with a plain forward runs."""
    argv = ["train", "dataset=synthetic", "data.train_size=32", *QUICK, f"out_dir={tmp_path}", "name=run",
            "model.name=plain_net"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "last.pth").is_file()


# ------------------------------------------------------------------------------------------------ image folders


CLASSES = ["ant", "bee", "cat"]


def write_tree(root: Path, splits=("train", "val"), per_class: int = 2) -> Path:
    rng = np.random.RandomState(0)
    for split in splits:
        for name in CLASSES:
            for k in range(per_class):
                write_png(root / split / name / f"{k}.png", rng.randint(0, 256, (16, 16, 3)).astype(np.uint8))
    return root


def folder_argv(command: str, root: Path, out: Path, tmp_path: Path) -> list[str]:
    argv = [command, "dataset=folder", f"data.root={root}", "data.image_size=16", "model.name=resnet8", *QUICK,
            f"out_dir={out}", "name=run"]
    if command == "distill":
        argv += ["teacher.name=resnet8", f"teacher.weights={resnet8_weights(tmp_path / 't.pth', 3)}", "method=kd"]
    return argv


def empty_class_folder(root: Path) -> tuple[str, ...]:
    write_tree(root)
    for path in (root / "train" / "bee").iterdir():
        path.unlink()
    return ("folder: class folder train/bee has no images", str(root / "train" / "bee"))


def no_class_folders(root: Path) -> tuple[str, ...]:
    (root / "train").mkdir(parents=True)
    write_tree(root, splits=("val",))
    write_png(root / "train" / "loose.png", np.zeros((16, 16, 3), np.uint8))  # an image, but in no class folder
    return ("folder: train/ has no class folders",)


def no_folders_at_all(root: Path) -> tuple[str, ...]:
    root.mkdir(parents=True)
    return ("folder: missing folder train/", "ADAKD_DATA_FOLDER")


@pytest.mark.parametrize("make", [empty_class_folder, no_class_folders, no_folders_at_all])
@pytest.mark.parametrize("command", ["train", "distill"])
def test_folder_without_images(tmp_path, capsys, make, command):
    root = tmp_path / "imgs"
    phrases = make(root)
    before = snapshot(root)
    out = tmp_path / "runs"
    fails(capsys, folder_argv(command, root, out, tmp_path), out, *phrases)
    assert snapshot(root) == before


@pytest.mark.parametrize("command", ["train", "distill"])
def test_val_lacks_a_class_of_train(tmp_path, capsys, command):
    root = write_tree(tmp_path / "imgs")
    shutil.rmtree(root / "val" / "cat")
    before = snapshot(root)
    out = tmp_path / "runs"
    fails(capsys, folder_argv(command, root, out, tmp_path), out,
          "train/ and val/ must hold the same class folders", "only in train/: ['cat']")
    assert snapshot(root) == before


# ------------------------------------------------------------------------------------------------- IDX files


def write_idx_set(root: Path, gz: bool = False) -> None:
    """The four IDX files flat in root: 16 train and 8 test 28 x 28 images."""
    rng = np.random.RandomState(0)
    for prefix, n in (("train", 16), ("t10k", 8)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.randint(0, 256, (n, 28, 28)).astype(np.uint8),
                  IMAGES, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), LABELS, gz)


def wrong_magic(root: Path) -> tuple[str, ...]:
    write_idx_set(root)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])
    return ("train-images-idx3-ubyte has magic number 0x12345678, not 0x00000803", str(path))


def labels_file_holds_images(root: Path) -> tuple[str, ...]:
    write_idx_set(root)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((16, 28, 28), np.uint8), IMAGES))
    return ("train-labels-idx1-ubyte has magic number 0x00000803, not 0x00000801",)


def truncated_test_images(root: Path) -> tuple[str, ...]:
    write_idx_set(root)
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])  # the test split: found before training starts, too
    return ("t10k-images-idx3-ubyte declares 8 x 28 x 28 = 6272 values but holds 6172 bytes", "truncated")


def too_short_for_a_header(root: Path) -> tuple[str, ...]:
    write_idx_set(root)
    (root / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    return ("train-labels-idx1-ubyte is 2 bytes, too short for an IDX header",)


def truncated_gzip(root: Path) -> tuple[str, ...]:
    write_idx_set(root, gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    return ("cannot read train-images-idx3-ubyte.gz (EOFError",)


def gzip_of_garbage(root: Path) -> tuple[str, ...]:
    write_idx_set(root, gz=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all, just text\n" * 4)
    return ("cannot read train-images-idx3-ubyte.gz",)


def fewer_labels(root: Path) -> tuple[str, ...]:
    write_idx_set(root)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), LABELS)
    return ("train-labels-idx1-ubyte holds 11 labels but train-images-idx3-ubyte 16 images",)


@pytest.mark.parametrize("corrupt", [wrong_magic, labels_file_holds_images, truncated_test_images,
                                     too_short_for_a_header, truncated_gzip, gzip_of_garbage, fewer_labels])
@pytest.mark.parametrize(("dataset", "command"), [("mnist", "train"), ("fashion-mnist", "distill")])
def test_corrupt_idx_file(tmp_path, capsys, corrupt, dataset, command):
    root = tmp_path / "idx"
    phrases = corrupt(root)
    before = snapshot(root)
    out = tmp_path / "runs"
    argv = [command, f"dataset={dataset}", f"data.root={root}", "data.image_size=16", "model.name=resnet8", *QUICK,
            f"out_dir={out}", "name=run"]
    if command == "distill":
        argv += ["teacher.name=resnet8", f"teacher.weights={resnet8_weights(tmp_path / 't.pth', 10)}", "method=kd"]
    line = fails(capsys, argv, out, *phrases)
    assert line.startswith(f"adakd: error: {dataset}: "), line  # the dataset is named first
    assert snapshot(root) == before


def test_the_fake_idx_set_itself_trains(tmp_path):
    """The control for the corrupt files: the uncorrupted set runs, so each failure above is its corruption."""
    write_idx_set(tmp_path / "idx")
    argv = ["train", "dataset=mnist", f"data.root={tmp_path / 'idx'}", "data.image_size=16", "model.name=resnet8",
            *QUICK, f"out_dir={tmp_path / 'runs'}", "name=run"]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "run" / "last.pth").is_file()
