"""Your own data through the engine: IDX files, an image folder and a registered Dataset train and distill."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data.fake_data_files import write_idx, write_png  # tests/data, through the rootdir on sys.path

from adakd import data
from adakd.cli import main

QUICK = ["log.progress=false", "log.tensorboard=false", "model.name=resnet8", "data.batch_size=16",
         "data.num_workers=0", "optim.milestones=[]"]


def banded(n: int, classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images where class c lights a horizontal band of its own, under noise: learnable in an epoch or two."""
    rng = np.random.RandomState(seed)
    labels = np.arange(n) % classes
    images = rng.randint(0, 60, (n, size, size)).astype(np.uint8)
    band = size // classes
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band] += 180
    return images, labels.astype(np.uint8)


def test_fashion_mnist_idx_files_train_a_one_channel_model(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    for prefix, n, seed in (("train", 240, 0), ("t10k", 60, 1)):
        images, labels = banded(n, 10, 28, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803, gz=prefix == "t10k")
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 0x801)
    argv = ["train", "dataset=fashion-mnist", f"data.root={tmp_path}", "data.image_size=16", "epochs=3",
            f"out_dir={tmp_path / 'runs'}", "name=fm", *QUICK]
    assert main(argv) == 0
    run = tmp_path / "runs" / "fm"
    state = torch.load(run / "last.pth", weights_only=True)["model"]
    assert state["conv1.weight"].shape[1] == 1  # grayscale data, 1-channel stem
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_acc1"] > 20.0  # chance: 10 %; measured 40 %


def test_eval_rebuilds_the_run_s_model_as_training_built_it(tmp_path, capsys):
    """`adakd eval RUN` of a grayscale run with a width multiplier scores it (it rebuilt the model by name only: a
    3-channel stem and width 1, refused as 'does not fit'), and gives the run's own last-epoch accuracy."""
    raw = tmp_path / "FashionMNIST" / "raw"
    for prefix, n, seed in (("train", 96, 0), ("t10k", 40, 1)):
        images, labels = banded(n, 10, 28, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 0x801)
    argv = ["train", "dataset=fashion-mnist", f"data.root={tmp_path}", "data.image_size=16", "epochs=1",
            f"out_dir={tmp_path / 'runs'}", "name=fm", *QUICK, "model.name=mobilev2", "model.width_mult=0.25"]
    assert main(argv) == 0
    run = tmp_path / "runs" / "fm"
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    last = json.loads((run / "summary.json").read_text())["last_acc1"]
    assert f"top-1 {last:.2f}%" in printed, printed


@pytest.mark.parametrize("strategy", ["sakd", "abl-search"])
def test_adaptive_strategies_distil_on_grayscale_data(tmp_path, strategy):
    """SAKD's adapters and ABL's heads are sized from a probe with the data's channel count (1 here), not 3."""
    raw = tmp_path / "FashionMNIST" / "raw"
    for prefix, n, seed in (("train", 96, 0), ("t10k", 40, 1)):
        images, labels = banded(n, 10, 28, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 0x801)
    common = ["dataset=fashion-mnist", f"data.root={tmp_path}", "data.image_size=16", "epochs=1",
              f"out_dir={tmp_path / 'runs'}", *QUICK]
    assert main(["train", "name=teacher", *common]) == 0
    extra = ["strategy.args.warm_steps=2", "strategy.args.meta_steps=2"] if strategy.startswith("abl") else []
    assert main(["distill", "name=student", "teacher.name=resnet8",
                 f"teacher.weights={tmp_path / 'runs' / 'teacher' / 'last.pth'}", "method=at",
                 f"strategy={strategy}", *extra, *common]) == 0
    assert (tmp_path / "runs" / "student" / "summary.json").is_file()


def write_folder(root: Path, per_class: dict[str, int], seed: int) -> None:
    classes = ["ant", "bee", "cat"]
    for split, n in per_class.items():
        images, labels = banded(n, 3, 16, seed + len(split))
        for i, (image, label) in enumerate(zip(images, labels)):
            write_png(root / split / classes[label] / f"{i}.png", np.stack([image] * 3, axis=-1))


def test_an_image_folder_of_three_classes_trains_and_distils(tmp_path):
    write_folder(tmp_path / "imgs", {"train": 96, "val": 30}, seed=0)
    common = ["dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.image_size=16", f"out_dir={tmp_path}",
              *QUICK]
    assert main(["train", *common, "epochs=3", "name=teacher"]) == 0
    teacher = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert teacher["last_acc1"] > 50.0  # chance: 33 %
    assert main(["distill", *common, "epochs=2", "name=kd", "teacher.name=resnet8",
                 f"teacher.weights={tmp_path / 'teacher'}", "method=kd"]) == 0
    scored = json.loads((tmp_path / "kd" / "teacher.json").read_text())
    assert scored["acc1"] == pytest.approx(teacher["last_acc1"])  # the run folder's last.pth was the teacher


class Squares(torch.utils.data.Dataset):
    """A user's Dataset of (image, target) items: class 1 has a bright centre square."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.targets = [k % 2 for k in range(n)]
        self.images = torch.randn(n, 3, 16, 16, generator=generator) * 0.3
        for k, target in enumerate(self.targets):
            if target:
                self.images[k, :, 4:12, 4:12] += 2.0
        self.classes = ["plain", "square"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def test_a_registered_dataset_of_the_users_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_MODULES", dict(data._MODULES))  # the registration ends with the test
    data.register_dataset("squares", lambda split, root=None, **_: Squares(64 if split == "train" else 32,
                                                                           seed=int(split == "test")))
    argv = ["train", "dataset=squares", "epochs=2", f"out_dir={tmp_path}", "name=sq", *QUICK]
    assert main(argv) == 0
    assert json.loads((tmp_path / "sq" / "summary.json").read_text())["last_acc1"] > 80.0  # chance: 50 %
