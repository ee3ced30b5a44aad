"""One test per row of docs/bad-input.md: each malformed input gives one clear line, exit 2, and loses nothing on disk.

Every case runs `adakd.cli.main` in-process on the embedded digits (nothing downloads); one runs the real console
entry point in a subprocess to check the process exit status.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adakd import models
from adakd.cli import main
from cli_checks import fails, snapshot
from tiny_run import TINY_RUN, save_random_teacher

FAST = ["--preset", "demo", *TINY_RUN]






def run_argv(tmp_path: Path, *extra: str, command: str = "train", name: str = "run") -> list[str]:
    return [command, *FAST, f"out_dir={tmp_path / 'runs'}", f"name={name}", *extra]


def weights(path: Path, name: str = "resnet8") -> Path:
    return save_random_teacher(path, name, epoch=240)


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def distill_argv(tmp_path: Path, *extra: str, teacher: str = "resnet8", teacher_weights: Path | None = None,
                 name: str = "run") -> list[str]:
    path = teacher_weights or weights(tmp_path / f"{teacher}.pth", teacher)
    return run_argv(tmp_path, "task=distill", f"teacher.name={teacher}", f"teacher.weights={path}", *extra,
                    command="distill", name=name)


def fake_cifar(root: Path) -> Path:
    """A cifar-100-python folder in the authors' pickle format, with 20 train and 10 test images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", 20), ("test", 10)):
        obj = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
               b"fine_labels": [int(v) for v in rng.randint(0, 100, n)]}
        (folder / split).write_bytes(pickle.dumps(obj, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, 2))
    return folder


def fake_tiny(root: Path) -> Path:
    """A two-class tiny-imagenet-200 folder of 64 x 64 JPEGs."""
    folder = root / "tiny-imagenet-200"
    rng = np.random.RandomState(0)
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("n01\nn02\n")
    for wnid in ("n01", "n02"):
        for k in range(2):
            path = folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(path)
    Image.fromarray(rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)).save(folder / "val" / "images" / "v.JPEG")
    (folder / "val" / "val_annotations.txt").write_text("v.JPEG\tn01\t0\t0\t1\t1\n")
    return folder


# ---- config


@pytest.mark.parametrize("extra, fragments", [
    (["optim.lrr=0.1"], ["unknown config key optim.lrr", "did you mean optim.lr?"]),
    (["data.batchsize=8"], ["unknown config key data.batchsize", "did you mean data.batch_size?"]),
    (["epoch=3"], ["unknown config key epoch", "valid keys: task, seed"]),
])
def test_unknown_config_key(tmp_path, capsys, extra, fragments):
    fails(capsys, run_argv(tmp_path, *extra), *fragments)
    assert not (tmp_path / "runs").exists()


def test_unknown_key_in_a_yaml_file(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text("optim:\n  lr: 0.1\n  mometum: 0.9\n")
    fails(capsys, ["train", "--config", str(path)], "unknown config key optim.mometum", "did you mean optim.momentum?")
    assert path.read_text() == "optim:\n  lr: 0.1\n  mometum: 0.9\n"


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=abc", "optim.lr: expected float, got str 'abc'"),
    ("data.batch_size=1.5", "data.batch_size: expected int, got float 1.5"),
    ("log.progress=maybe", "log.progress: expected bool, got str 'maybe'"),
    ("optim.milestones=5", "optim.milestones: expected a list, got 5"),
    ("seed=true", "seed: expected int, got the boolean True"),
])
def test_wrong_type(tmp_path, capsys, override, fragment):
    fails(capsys, run_argv(tmp_path, override), fragment)


def test_missing_or_malformed_config_file(tmp_path, capsys):
    fails(capsys, ["train", "--config", str(tmp_path / "none.yaml")], "config file", "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [lr: 0.1\n")
    fails(capsys, ["train", "--config", str(broken)], "is not valid YAML")


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("data.test_batch_size=-4", "data.test_batch_size must be >= 1"),
    ("optim.epochs=0", "optim.epochs must be >= 1, got 0"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1), got 1.5"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.lr_decay=2", "optim.lr_decay must be in (0, 1]"),
    ("optim.milestones=[5,2]", "optim.milestones must be increasing"),
    ("optim.milestones=[0]", "optim.milestones must be epochs >= 1"),
    ("distill.temperature=0", "distill.temperature must be > 0, got 0.0"),
    ("distill.kl_weight=-1", "distill.kl_weight must be >= 0"),
    ("distill.args.temperature=0", "distill.args.temperature must be > 0"),
    ("seed=-1", "seed must lie in [0, 65536)"),
    ("data.image_size=0", "data.image_size must be >= 1"),
    ("data.train_size=0", "data.train_size must be >= 1"),
    ("data.train_size=-5", "data.train_size must be >= 1 (or null for the whole training set), got -5"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.tiny_aug=zoom", "data.tiny_aug must be 'flip' or 'crop', got 'zoom'"),
    ("model.width_mult=0", "model.width_mult must be > 0"),
    ("device=tpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("log.interval=0", "log.interval must be >= 1"),
    ("threads=0", "threads must be >= 1"),
])
def test_out_of_range_hyper_parameter(tmp_path, capsys, override, fragment):
    fails(capsys, run_argv(tmp_path, override), fragment)
    assert not (tmp_path / "runs").exists()  # rejected before a run directory is made


@pytest.mark.parametrize("strategy, option, fragment", [
    ("sakd", "strategy.args.gumbel_tau_min=0", "strategy.args: strategy options need 0 < gumbel_tau_min"),
    ("sakd", "strategy.args.adapter=conv3", "strategy.args: strategy option adapter must be one of"),
    ("sakd", "strategy.args.gumbel_tauu=1", "unknown strategy option(s) ['gumbel_tauu']"),
    ("abl-search", "strategy.args.val_fraction=1.5", "strategy.args.val_fraction: the held-out fraction must lie"),
    ("abl-search", "strategy.args.meta_lr=-1", "strategy.args: meta_lr must be > 0, got -1"),
    ("abl-search", "strategy.args.meta_betas=[0.5,1.5]", "strategy.args: meta_betas must be two numbers in [0, 1)"),
    ("abl-search", "strategy.args.meta_weight_decay=-1", "strategy.args: meta_weight_decay must be >= 0"),
    ("abl-search", "strategy.args.aux_type=aux9", "strategy.args: aux_type must be one of"),
    ("abl-search", "strategy.args.meta_every=0", "strategy.args: meta_every must be >= 1"),
])
def test_out_of_range_strategy_option(tmp_path, capsys, strategy, option, fragment):
    fails(capsys, distill_argv(tmp_path, f"strategy={strategy}", option), fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, fragments", [
    ("model.name=resnet21", ["unknown model 'resnet21'", "Did you mean", "'resnet20'", "Available:"]),
    ("method=kdd", ["unknown distiller 'kdd'", "Did you mean 'kd'"]),
    ("strategy=sakdd", ["unknown strategy 'sakdd'", "Did you mean 'sakd'"]),
    ("data.name=cifar1000", ["unknown dataset 'cifar1000'", "did you mean cifar100 or cifar10?"]),
    ("teacher.name=resnt8", ["unknown model 'resnt8'", "'resnet8'"]),
])
def test_unknown_name(tmp_path, capsys, override, fragments):
    fails(capsys, distill_argv(tmp_path, override), *fragments)


def test_unknown_preset(capsys):
    fails(capsys, ["train", "--preset", "dem"], "unknown preset 'dem'", "Did you mean demo?")


def test_unknown_method_argument(tmp_path, capsys):
    fails(capsys, distill_argv(tmp_path, "method=kd", "distill.args.tempp=3"),
          "unknown config key distill.args.tempp; valid keys: temperature")


@pytest.mark.parametrize("extra, fragments", [
    # method=at between vgg8 (4 body stages) and resnet8 (3) now pairs stages by size: test_small_fixes.py.
    (["method=fitnets", "distill.spots=[9]"], ["fitnets cannot distill vgg8 -> resnet8", "spot 9 is not a stage"]),
])
def test_incompatible_teacher_student_pair(tmp_path, capsys, extra, fragments):
    fails(capsys, distill_argv(tmp_path, *extra, teacher="vgg8"), *fragments)
    assert not (tmp_path / "runs").exists()


# ---- datasets


def test_missing_dataset_folder(tmp_path, capsys):
    fails(capsys, run_argv(tmp_path, "data.name=cifar100", f"data.root={tmp_path / 'nowhere'}", "data.image_size=null",
                           "data.download=false"),
          "cifar100: no cifar-100-python folder", "data.root", "ADAKD_DATA_CIFAR100", "data.download=true")


def test_truncated_cifar_file(tmp_path, capsys):
    folder = fake_cifar(tmp_path / "cifar")
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 2])
    before = snapshot(folder)
    fails(capsys, run_argv(tmp_path, "data.name=cifar100", f"data.root={folder.parent}", "data.image_size=null"),
          "cifar100: cannot read train as a CIFAR pickle", "truncated")
    assert snapshot(folder) == before


def test_cifar_file_with_a_pickled_payload_is_not_executed(tmp_path, capsys):
    folder = fake_cifar(tmp_path / "cifar")
    marker = tmp_path / "PWNED"
    (folder / "train").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    fails(capsys, run_argv(tmp_path, "data.name=cifar100", f"data.root={folder.parent}", "data.image_size=null"),
          "refusing to read train: refused global", ".system", "nothing in it was executed")
    assert not marker.exists()


def test_corrupt_tiny_imagenet_image(tmp_path, capsys):
    folder = fake_tiny(tmp_path / "tiny")
    (folder / "train" / "n02" / "images" / "n02_1.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg")
    before = snapshot(folder)
    fails(capsys, run_argv(tmp_path, "data.name=tiny-imagenet", f"data.root={folder.parent}", "data.image_size=null",
                           "data.train_size=null"),
          "tiny-imagenet: cannot decode n02_1.JPEG")
    assert snapshot(folder) == before


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_imagenet_image_mid_epoch(tmp_path, capsys, workers):
    root = tmp_path / "imagenet"
    for split, per_class in (("train", 2), ("val", 1)):
        for c, wnid in enumerate(["n01440764", "n01443537"]):
            for k in range(per_class):
                path = root / split / wnid / f"{wnid}_{k}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((40, 48, 3), 40 * c + k, np.uint8)).save(path)
    bad = root / "train" / "n01443537" / "n01443537_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")  # ImageFolder lists it; decoding fails only when it is read
    before = snapshot(root)
    fails(capsys, ["train", "--preset", "demo", f"out_dir={tmp_path / 'runs'}", "name=run", "data.name=imagenet",
                   f"data.root={root}", "data.image_size=null", "data.train_size=null", "data.batch_size=2",
                   "data.test_batch_size=2", f"data.num_workers={workers}", "model.name=resnet18", "optim.epochs=1",
                   "log.progress=false", "log.tensorboard=false"],
          "cannot decode image", "n01443537_1.JPEG", "replace or remove the file")
    assert snapshot(root) == before


# ---- checkpoints


def test_checkpoint_of_the_wrong_architecture(tmp_path, capsys):
    path = weights(tmp_path / "resnet8.pth")
    before = path.read_bytes()
    fails(capsys, distill_argv(tmp_path, teacher="resnet20", teacher_weights=path),
          f"checkpoint '{path}' does not fit model 'resnet20'", "missing keys", "Check that the model name")
    fails(capsys, run_argv(tmp_path, "model.name=vgg8", f"model.weights={path}"),
          "does not fit model 'vgg8'", "unexpected keys")
    assert path.read_bytes() == before


def test_truncated_checkpoint(tmp_path, capsys):
    path = weights(tmp_path / "teacher.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    fails(capsys, distill_argv(tmp_path, teacher_weights=path), "is truncated or not a PyTorch file",
          "Re-download or re-save it")
    assert path.read_bytes() == before


def test_file_that_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    fails(capsys, run_argv(tmp_path, f"model.weights={path}"), "is truncated or not a PyTorch file")
    empty = tmp_path / "empty.pth"
    empty.touch()
    fails(capsys, run_argv(tmp_path, f"model.weights={empty}"), "is truncated or not a PyTorch file")


def test_checkpoint_with_a_pickled_payload_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict(), "extra": Payload(marker)}, path)
    line = fails(capsys, distill_argv(tmp_path, teacher_weights=path), f"refusing to load '{path}'",
                 "reading it would call posix.system", "nothing in it was executed", "Do not use this file")
    # never advise the settings that would run the payload
    assert "weights_only=False" not in line and "add_safe_globals" not in line
    run = tmp_path / "victim"
    run.mkdir()
    (run / "last.pth").write_bytes(path.read_bytes())
    fails(capsys, ["train", "--resume", str(run)], "refusing to load")
    assert not marker.exists()


def test_missing_checkpoint(tmp_path, capsys):
    fails(capsys, distill_argv(tmp_path, teacher_weights=tmp_path / "none.pth"), "does not exist",
          "pass the path of a .pth/.pt/.safetensors file")


# ---- run directories


@pytest.fixture
def finished_run(tmp_path):
    """A real one-epoch run directory, and the bytes of every file in it."""
    assert main(run_argv(tmp_path, name="done")) == 0
    folder = tmp_path / "runs" / "done"
    return folder, snapshot(folder)


def test_run_directory_that_exists(tmp_path, capsys, finished_run):
    folder, before = finished_run
    capsys.readouterr()
    fails(capsys, run_argv(tmp_path, "optim.lr=0.1", name="done"), "already exists", f"--resume {folder}",
          "name=NEW_NAME")
    assert snapshot(folder) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    fails(capsys, run_argv(tmp_path, "out_dir=" + str(tmp_path), name="other"), "already exists")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_with_a_bad_override_keeps_the_run(tmp_path, capsys, finished_run):
    folder, before = finished_run
    capsys.readouterr()
    fails(capsys, ["train", "--resume", str(folder), "optim.lr=-1"], "optim.lr must be > 0")
    fails(capsys, ["train", "--resume", str(folder), "optim.lrr=1"], "unknown config key optim.lrr")
    assert snapshot(folder) == before


def test_resume_of_a_folder_without_last_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, ["train", "--resume", str(tmp_path / "empty")], "cannot resume", "has no last.pth")
    fails(capsys, ["train", "--resume", str(tmp_path / "missing")], "cannot resume", "no such folder")


def test_new_run_in_a_folder_left_without_checkpoint(tmp_path, capsys):
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")  # a run killed before its first epoch ended
    before = snapshot(folder)
    fails(capsys, run_argv(tmp_path), "holds no last.pth", "delete the folder or choose another")
    assert snapshot(folder) == before


def test_cuda_requested_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(capsys, run_argv(tmp_path, "device=cuda"), "CUDA is not available", "device=cpu")
    assert not (tmp_path / "runs").exists()


def test_width_multiplier_for_a_model_without_one(tmp_path, capsys):
    fails(capsys, run_argv(tmp_path, "model.width_mult=0.5"), "model.width_mult", "has no width multiplier")
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_broken_or_foreign_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = weights(run / "last.pth").read_bytes()
    fails(capsys, ["train", "--resume", str(run)], "is not an adakd run checkpoint", "model.weights=PATH")
    (run / "last.pth").write_bytes(data[: len(data) // 3])
    before = snapshot(run)
    fails(capsys, ["train", "--resume", str(run)], "is truncated or not a PyTorch file")
    assert snapshot(run) == before


# ---- eval


def test_eval_of_a_missing_or_wrong_checkpoint(tmp_path, capsys):
    fails(capsys, ["eval", str(tmp_path / "none.pth"), "model.name=resnet8", "data.name=digits"], "does not exist")
    (tmp_path / "not_a_run").mkdir()
    fails(capsys, ["eval", str(tmp_path / "not_a_run"), "model.name=resnet8", "data.name=digits"], "does not exist")
    path = weights(tmp_path / "vgg8.pth", "vgg8")
    fails(capsys, ["eval", str(path), "model.name=resnet8", "data.name=digits", "data.image_size=8"],
          "does not fit model 'resnet8'")


# ---- the process


def test_console_exit_status_is_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "adakd", "train", "optim.lrr=0.1", f"out_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["adakd: error: unknown config key optim.lrr; did you mean optim.lr?"]
    assert not any(tmp_path.iterdir())


def test_non_finite_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from adakd.strategies.standard import Standard

    original = Standard.training_step

    def poisoned(self, images, targets, indices, epoch, step=0):
        out = original(self, images, targets, indices, epoch, step)
        if epoch == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Standard, "training_step", poisoned)
    argv = run_argv(tmp_path, "optim.epochs=3")
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "loss became nan in epoch 2" in err and "last good checkpoint is kept" in err
    state = torch.load(tmp_path / "runs" / "run" / "last.pth", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---- run folders given where a file or a run is expected


def test_run_folder_without_last_checkpoint_as_weights(tmp_path, capsys):
    folder = tmp_path / "my_teacher"
    folder.mkdir()
    (folder / "config.yaml").write_text("seed: 0\n")  # a teacher run killed before its first epoch ended
    before = snapshot(folder)
    fails(capsys, distill_argv(tmp_path, teacher_weights=folder), f"{str(folder)!r} is a folder without last.pth",
          "give a checkpoint file", "a run folder that finished an epoch")
    assert snapshot(folder) == before
    assert not (tmp_path / "runs").exists()


def test_eval_of_a_run_without_the_requested_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    weights(run / "last.pth")  # existence is checked before anything is read
    before = snapshot(run)
    fails(capsys, ["eval", str(run), "--checkpoint", "best"], f"{str(run / 'best.pth')!r} does not exist",
          "has no best.pth", "--checkpoint last")
    (run / "last.pth").rename(run / "best.pth")
    fails(capsys, ["eval", str(run)], f"{str(run / 'last.pth')!r} does not exist", "--checkpoint best")
    assert snapshot(run) == {"best.pth": before["last.pth"]}


def test_plot_of_a_folder_that_is_neither_a_run_nor_a_pipeline(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("mine")
    fails(capsys, ["plot", str(folder)], f"{str(folder)!r} is neither a run folder", "metrics.csv",
          "pipeline.yaml", "give the folder of a run")
    assert snapshot(folder) == {"readme.txt": b"mine"}
    fails(capsys, ["plot", str(tmp_path / "missing")], "does not exist, so it is neither a run folder")
    assert not (tmp_path / "missing").exists()
