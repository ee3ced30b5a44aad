"""Checkpoints as the field's training scripts write them load with weights_only=True; nothing in a file ever runs.

Each file below is written with the entries, key names and value types of one peer script (the CRD benchmark's
train_teacher.py, mdistiller's trainer, the SAKD authors' train.py, timm's train.py saver, PyTorch Lightning), built
from real optimizer / scheduler state and argparse options, so what `torch.save` pickles is what theirs pickles.
"""
from __future__ import annotations

import argparse
import builtins
import io
import os
import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from adakd import models
from adakd.cli import main
from adakd.models.checkpoint import (DATA_ONLY_GLOBALS, CheckpointError, classifier_keys, load_state_dict_file,
                                     load_weights)
from cli_checks import fails
from tiny_run import TINY_RUN

FAST = ["--preset", "demo", *TINY_RUN]
EVAL = ["model.name=resnet8", "data.name=digits", "data.image_size=8", "data.num_workers=0"]


def trained(name: str = "resnet8", seed: int = 1, num_classes: int = 10) -> tuple[nn.Module, torch.optim.SGD,
                                                                                  torch.optim.lr_scheduler.MultiStepLR]:
    """A zoo model after one SGD step (momentum buffers filled), its optimizer and the CRD recipe's schedule."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes=num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[150, 180, 210], gamma=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    schedule.step()
    return model, optimizer, schedule


def crd_options(model: str = "resnet8") -> argparse.Namespace:
    """The options train_teacher.py parses (and keeps in its last checkpoint as 'opt'), after its own edits."""
    return argparse.Namespace(
        print_freq=100, tb_freq=500, save_freq=40, batch_size=64, num_workers=8, epochs=240, learning_rate=0.05,
        lr_decay_epochs=[150, 180, 210], lr_decay_rate=0.1, weight_decay=5e-4, momentum=0.9, model=model,
        dataset="cifar100", trial=0, model_path="./save/models", tb_path="./save/tensorboard",
        model_name=f"{model}_cifar100_lr_0.05_decay_0.0005_trial_0",
        tb_folder=f"./save/tensorboard/{model}_cifar100_lr_0.05_decay_0.0005_trial_0",
        save_folder=f"./save/models/{model}_cifar100_lr_0.05_decay_0.0005_trial_0")


def assert_same_network(loaded: nn.Module, source: nn.Module, shape: tuple[int, ...] = (2, 3, 32, 32)) -> None:
    """Every entry of the state equal, and the same outputs on one batch."""
    mine, theirs = loaded.state_dict(), source.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    x = torch.randn(*shape)
    assert torch.equal(loaded.eval()(x), source.eval()(x))


def fresh(name: str = "resnet8", num_classes: int = 10) -> nn.Module:
    torch.manual_seed(123)  # differs from every `trained` seed, so nothing fits before loading
    return models.create(name, num_classes=num_classes)


# --- The CRD benchmark (HobbitLong/RepDistiller train_teacher.py / train_student.py) and copies passed around. ---

@pytest.mark.parametrize("accuracy", [torch.tensor(72.34), np.float64(72.34), np.float32(72.34), 72.34],
                         ids=["tensor", "np.float64", "np.float32", "float"])
@pytest.mark.parametrize("form", ["best", "every_n", "last"])
def test_crd_benchmark_checkpoints_load(tmp_path: Path, form: str, accuracy) -> None:
    model, optimizer, _ = trained()
    if form == "best":  # <model>_best.pth whenever the test accuracy improves
        state, name = {"epoch": 183, "model": model.state_dict(), "best_acc": accuracy,
                       "optimizer": optimizer.state_dict()}, "resnet8_best.pth"
    elif form == "every_n":  # ckpt_epoch_{N}.pth every save_freq epochs (the published teachers: N=240)
        state, name = {"epoch": 240, "model": model.state_dict(), "accuracy": accuracy,
                       "optimizer": optimizer.state_dict()}, "ckpt_epoch_240.pth"
    else:  # <model>_last.pth after the last epoch: the argparse options ride along
        state, name = {"opt": crd_options(), "model": model.state_dict(), "optimizer": optimizer.state_dict()}, \
            "resnet8_last.pth"
    torch.save(state, tmp_path / name)
    assert_same_network(load_weights(fresh(), tmp_path / name), model)
    read = load_state_dict_file(tmp_path / name)
    if form == "last":
        assert read["opt"] == crd_options() and isinstance(read["opt"], argparse.Namespace)
    else:
        value = read["best_acc" if form == "best" else "accuracy"]
        assert type(value) is type(accuracy) and float(value) == float(accuracy)


def numpy1_pickle_module() -> types.ModuleType:
    """A pickle module for torch.save that names the numpy scalar rebuilder as numpy 1 did (numpy.core...)."""

    class Pickler(pickle.Pickler):
        def __init__(self, file, protocol=None) -> None:
            self.target, self.buffer = file, io.BytesIO()
            super().__init__(self.buffer, protocol)

        def dump(self, obj) -> None:
            super().dump(obj)
            data = self.buffer.getvalue()
            assert b"numpy._core.multiarray\nscalar" in data  # protocol 2: the global is plain text
            self.target.write(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))

    module = types.ModuleType("numpy1_pickle")
    module.Pickler, module.dump = Pickler, pickle.dump  # what torch.save uses of a pickle module
    return module


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pre-1.6"])
def test_published_teacher_written_by_old_torch_and_numpy_1_loads(tmp_path: Path, zip_format: bool) -> None:
    """The 2019 teachers predate torch 1.6's zip format, and numpy 1 named its scalar rebuilder numpy.core...."""
    model, optimizer, _ = trained("resnet8", seed=2)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": np.float64(72.34),
                "optimizer": optimizer.state_dict()}, path, pickle_module=numpy1_pickle_module(),
               _use_new_zipfile_serialization=zip_format)
    assert b"numpy.core.multiarray" in (path.read_bytes() if not zip_format else
                                        zipfile.ZipFile(path).read("ckpt_epoch_240/data.pkl"))
    assert_same_network(load_weights(fresh(), path), model)
    assert load_state_dict_file(path)["accuracy"] == np.float64(72.34)


# --- mdistiller (megvii-research/mdistiller engine/trainer.py): student_{latest,best,N} hold {'model': student}. ---

@pytest.mark.parametrize("name", ["student_best", "student_latest", "student_240"])
def test_mdistiller_student_checkpoints_load(tmp_path: Path, name: str) -> None:
    model, _, _ = trained("resnet8", seed=3)
    with open(tmp_path / name, "wb") as handle:  # its save_checkpoint opens the file itself; no extension
        torch.save({"model": model.state_dict()}, handle)
    assert_same_network(load_weights(fresh(), tmp_path / name), model)


# --- The SAKD authors' code (zju-vipa/spot-adaptive-pytorch train.py): ckpt/best.pth holds the policy too. ---

def test_sakd_authors_checkpoint_loads_the_student_and_says_nothing(tmp_path: Path) -> None:
    model, optimizer, schedule = trained("resnet8", seed=4)
    policy = nn.Sequential(nn.Linear(128, 4))  # the spot policy network: another state_dict in the same file
    path = tmp_path / "best.pth"
    torch.save({"epoch": 240, "model": model.state_dict(), "policy": policy.state_dict(),
                "acc": torch.tensor(71.9), "optimizer": optimizer.state_dict(),
                "lr_scheduler": schedule.state_dict(),  # its milestones are a collections.Counter
                "embed_s": nn.Linear(64, 128).state_dict(), "embed_t": nn.Linear(64, 128).state_dict()}, path)
    notes: list[str] = []
    assert_same_network(load_weights(fresh(), path, on_note=notes.append), model)
    assert notes == []  # 'policy' and the embeddings do not fit the model: no choice to report


# --- timm's train.py (CheckpointSaver._save): state_dict and state_dict_ema, args as a Namespace. ---

def timm_checkpoint(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    args = argparse.Namespace(model="test_resnet", num_classes=10, pretrained=False, img_size=None,
                              input_size=None, mean=None, std=None, interpolation="", batch_size=128, opt="sgd",
                              lr=0.1, momentum=0.9, weight_decay=2e-5, sched="cosine", epochs=300,
                              decay_milestones=[90, 180, 270], model_ema=True, model_ema_decay=0.9998,
                              aa="rand-m9-mstd0.5-inc1", device="cuda:0", distributed=False, world_size=1,
                              rank=0, output="", experiment="", data_dir="/data/imagenet", amp=True)
    torch.save({"epoch": 299, "arch": "test_resnet", "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "version": 2, "args": args,
                "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000, "_growth_tracker": 0},
                "state_dict_ema": ema.state_dict(), "metric": 79.42,
                "saver": {"checkpoint_files": [("checkpoint-299.pth.tar", 79.42)], "best_epoch": 299,
                          "best_metric": 79.42, "pending": (299, 79.42)}}, path)


def test_timm_checkpoint_takes_state_dict_says_so_and_loads_the_ema_on_request(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = timm.create_model("test_resnet", num_classes=10)
    torch.manual_seed(6)
    ema = timm.create_model("test_resnet", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "model_best.pth.tar"
    timm_checkpoint(path, model, ema, optimizer)

    notes: list[str] = []
    torch.manual_seed(7)
    loaded = load_weights(timm.create_model("test_resnet", num_classes=10), path, config_key="teacher",
                          on_note=notes.append)
    assert_same_network(loaded, model, (2, 3, 32, 32))
    assert notes == [f"teacher.weights {str(path)!r}: took its 'state_dict' entry; it also holds 'state_dict_ema' "
                     "for this model (choose with teacher.weights_key=state_dict_ema)"]

    notes.clear()
    chosen = load_weights(timm.create_model("test_resnet", num_classes=10), path, weights_key="state_dict_ema",
                          on_note=notes.append)
    assert_same_network(chosen, ema, (2, 3, 32, 32))
    assert notes == []  # the user chose: nothing to explain
    assert load_state_dict_file(path)["args"].model_ema_decay == 0.9998


def test_weights_key_not_in_the_file_lists_the_entries(tmp_path: Path) -> None:
    model, optimizer, _ = trained("resnet8", seed=8)
    path = tmp_path / "last.pth.tar"
    timm_checkpoint(path, model, model, optimizer)
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), path, weights_key="ema", config_key="model")
    assert str(info.value) == (
        f"model.weights_key=ema: checkpoint {str(path)!r} has no 'ema' entry; it holds 'epoch', 'arch', "
        "'state_dict', 'optimizer', 'version', 'args', 'amp_scaler', 'state_dict_ema', 'metric', 'saver': give one "
        "of its state_dict entries ('state_dict', 'state_dict_ema') or model.weights_key=null to take the first of "
        "'model', 'state_dict', 'model_state_dict'")
    with pytest.raises(CheckpointError, match="the 'optimizer' entry of checkpoint .* is not a state_dict"):
        load_weights(fresh(), path, weights_key="optimizer")
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="is a bare state_dict .*remove weights_key"):
        load_weights(fresh(), tmp_path / "bare.pth", weights_key="state_dict")


# --- PyTorch Lightning: the LightningModule's attribute prefixes every key. ---

def test_lightning_checkpoint_loads(tmp_path: Path) -> None:
    model, optimizer, schedule = trained("resnet8", seed=9)
    path = tmp_path / "epoch=239-step=187680.ckpt"
    torch.save({
        "epoch": 239, "global_step": 187680, "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 240, "completed": 239}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc', 'mode': 'max', 'every_n_train_steps': 0, "
                      "'every_n_epochs': 1, 'train_time_interval': None}": {
                          "monitor": "val_acc", "best_model_score": torch.tensor(72.34),
                          "best_model_path": "/runs/epoch=183.ckpt", "current_score": torch.tensor(72.1),
                          "dirpath": "/runs", "best_k_models": {"/runs/epoch=183.ckpt": torch.tensor(72.34)},
                          "kth_best_model_path": "/runs/epoch=183.ckpt", "kth_value": torch.tensor(72.34),
                          "last_model_path": ""}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [schedule.state_dict()],
        "hparams_name": "kwargs", "hyper_parameters": {"arch": "resnet8", "lr": 0.05, "num_classes": 10,
                                                       "best_acc": np.float64(72.34)},
    }, path)
    assert_same_network(load_weights(fresh(), path), model)


def test_bare_state_dict_loads(tmp_path: Path) -> None:
    model, _, _ = trained("resnet8", seed=10)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    assert_same_network(load_weights(fresh(), tmp_path / "weights.pth"), model)


# --- Nothing in a file runs; the allow-list holds data-only globals and nothing else. ---

def test_allow_list_is_data_only_and_does_not_outlive_the_load(tmp_path: Path) -> None:
    names = [name for name, _ in DATA_ONLY_GLOBALS]
    assert names[:4] == ["argparse.Namespace", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
                         "numpy.dtype"]
    assert all(name.startswith("numpy.dtypes.") and name.endswith("DType") for name in names[4:])
    assert "numpy.dtypes.Float64DType" in names and "numpy.dtypes.ObjectDType" not in names
    torch.save({"best_acc": np.float64(1.0), "opt": argparse.Namespace(lr=0.1)}, tmp_path / "a.pth")
    before = set(torch.serialization.get_safe_globals())
    load_state_dict_file(tmp_path / "a.pth")
    assert set(torch.serialization.get_safe_globals()) == before  # the user's own torch.load stays as strict
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "a.pth", weights_only=True)


class RunsCode:
    """Unpickling this runs code that creates `marker`: what a malicious checkpoint does."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("how, named", [("os.system", f"{os.name == 'nt' and 'nt' or 'posix'}.system"),
                                        ("exec", "exec")])
def test_pickle_that_would_run_code_is_refused_and_did_not_run(tmp_path: Path, how: str, named: str,
                                                                 zip_format: bool) -> None:
    if how == "os.system" and os.name != "posix":
        pytest.skip("the shell command is POSIX")
    marker, path = tmp_path / "PWNED", tmp_path / "teacher.pth"
    model, _, _ = trained()
    torch.save({"epoch": 240, "model": model.state_dict(), "best_acc": np.float64(72.34),
                "opt": RunsCode(marker, how)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {str(path)!r}: reading it would call ")
    assert named in message and "nothing in it was executed" in message and "Do not use this file" in message
    assert "weights_only=False" not in message and "add_safe_globals" not in message
    assert not marker.exists()
    # The payload is live: a plain unpickler does run it, so the refusal above is what kept the marker away.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unknown_but_inert_objects_are_refused_with_what_to_do(tmp_path: Path) -> None:
    model = models.create("resnet8", num_classes=10)
    torch.save(model, tmp_path / "whole_model.pth")  # the whole module pickled: classes of its own code
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), tmp_path / "whole_model.pth")
    message = str(info.value)
    assert f"refusing to load {str(tmp_path / 'whole_model.pth')!r}: it holds pickled Python objects (" in message
    assert f"{type(model).__module__}.{type(model).__name__}" in message
    assert "nothing in it was executed" in message and "torch.save(model.state_dict(), 'weights.pth')" in message
    assert "Do not use" not in message and "weights_only=False" not in message and "add_safe_globals" not in message
    # A numpy array is data, but its rebuilder is not on the list: only scalars and dtypes are.
    torch.save({"model": model.state_dict(), "history": np.zeros(3)}, tmp_path / "array.pth")
    with pytest.raises(CheckpointError) as info:
        load_weights(fresh(), tmp_path / "array.pth")
    assert "numpy.ndarray" in str(info.value) and "multiarray._reconstruct" in str(info.value)


# --- The classifier switch: a checkpoint trained on other classes loads all but its classifier. ---

def _timm_vit(num_classes: int) -> nn.Module:
    return timm.create_model("test_vit", num_classes=num_classes, img_size=32)


@pytest.mark.parametrize("build, head, shape", [
    (lambda n: models.create("resnet8", num_classes=n), ["fc.weight", "fc.bias"], (2, 3, 32, 32)),
    (lambda n: models.create("vgg8", num_classes=n), ["classifier.weight", "classifier.bias"], (2, 3, 32, 32)),
    (_timm_vit, ["head.weight", "head.bias"], (2, 3, 32, 32)),
    (lambda n: torchvision.models.resnet18(num_classes=n), ["fc.weight", "fc.bias"], (1, 3, 64, 64)),
], ids=["zoo-resnet8", "zoo-vgg8", "timm-test_vit", "torchvision-resnet18"])
def test_reset_classifier_loads_everything_but_the_head(tmp_path: Path, build, head: list[str], shape) -> None:
    torch.manual_seed(11)
    source = build(1000)  # an ImageNet-style 1000-class checkpoint ...
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(12)
    model = build(4)  # ... for a 4-class folder
    assert classifier_keys(model) == head
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k in head}

    with pytest.raises(CheckpointError) as info:
        load_weights(model, path, config_key="model")
    message = str(info.value)
    weight = head[0]
    assert (f"Only the classifier differs ({weight} {tuple(source.state_dict()[weight].shape)}, {head[1]} (1000,) "
            f"in the file vs {weight} {tuple(fresh_head[weight].shape)}, {head[1]} (4,) in the model: the file's is "
            "for 1000 classes, this model's for 4). To load everything else and train a fresh classifier for this "
            "dataset's classes, set model.reset_classifier=true") in message
    assert torch.equal(model.state_dict()[weight], fresh_head[weight])  # nothing was half-loaded

    notes: list[str] = []
    load_weights(model, path, reset_classifier=True, config_key="model", on_note=notes.append)
    assert notes == [f"model.weights {str(path)!r}: loaded all but the classifier ({', '.join(head)}), which starts "
                     "fresh for 4 classes (the file's was for 1000)"]
    loaded, theirs = model.state_dict(), source.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, fresh_head[key] if key in head else theirs[key]), key
    # The body computes what the checkpoint's body computes: the same features reach the head.
    model.eval(), source.eval()
    x = torch.randn(*shape)
    cut = {"fc": nn.Identity(), "classifier": nn.Identity(), "head": nn.Identity()}
    attribute = head[0].split(".")[0]
    setattr(model, attribute, cut[attribute]), setattr(source, attribute, cut[attribute])
    assert torch.equal(model(x), source(x))


def test_reset_classifier_still_refuses_a_body_that_does_not_fit(tmp_path: Path) -> None:
    torch.save(models.create("resnet20", num_classes=100).state_dict(), tmp_path / "resnet20.pth")
    model = fresh("resnet8", 4)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, tmp_path / "resnet20.pth", "resnet8", reset_classifier=True, config_key="teacher")
    message = str(info.value)
    assert "does not fit model 'resnet8' (unexpected keys: layer1.1.conv1.weight" in message
    assert "teacher.reset_classifier=true left the classifier (fc.weight, fc.bias) out of the comparison" in message
    assert "Only the classifier differs" not in message and "Check that the model name matches" in message


# --- End to end through the command line: one line, exit 2; the switch and the key work from the config. ---



def test_cli_unknown_global_in_a_checkpoint(tmp_path: Path, capsys) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(models.create("resnet8", num_classes=10), path)
    before = path.read_bytes()
    line = fails(capsys, ["eval", str(path), *EVAL], f"refusing to load {str(path)!r}",
                          "pickled Python objects", "nothing in it was executed", "re-save the weights alone")
    assert "weights_only=False" not in line and "add_safe_globals" not in line
    assert path.read_bytes() == before


def test_cli_weights_key_missing_and_chosen(tmp_path: Path, capsys) -> None:
    model, optimizer, _ = trained("resnet8", seed=13)
    torch.manual_seed(14)
    ema = models.create("resnet8", num_classes=10)
    path = tmp_path / "model_best.pth.tar"
    timm_checkpoint(path, model, ema, optimizer)
    fails(capsys, ["eval", str(path), *EVAL, "model.weights_key=ema"],
                   "model.weights_key=ema: checkpoint", "has no 'ema' entry; it holds 'epoch', 'arch', 'state_dict'",
                   "('state_dict', 'state_dict_ema')")
    assert main(["eval", str(path), *EVAL]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"model.weights {str(path)!r}: took its 'state_dict' entry; it also holds 'state_dict_ema' "
                      "for this model (choose with model.weights_key=state_dict_ema)")
    assert main(["eval", str(path), *EVAL, "model.weights_key=state_dict_ema"]) == 0
    chosen = capsys.readouterr().out.splitlines()
    assert len(chosen) == 1 and "top-1" in chosen[0]


def test_cli_classifier_mismatch_and_the_switch(tmp_path: Path, capsys) -> None:
    path = tmp_path / "hundred_classes.pth"
    torch.save({"epoch": 240, "model": models.create("resnet8", num_classes=100).state_dict(),
                "opt": crd_options(), "best_acc": np.float64(72.34)}, path)
    argv = ["train", *FAST, f"out_dir={tmp_path / 'runs'}", f"model.weights={path}"]
    fails(capsys, [*argv, "name=refused"], "fc.weight (100, 64), fc.bias (100,) in the file vs fc.weight "
                   "(10, 64), fc.bias (10,) in the model", "set model.reset_classifier=true")
    assert not (tmp_path / "runs" / "refused").exists()
    assert main([*argv, "name=switched", "model.reset_classifier=true"]) == 0
    log = (tmp_path / "runs" / "switched" / "log.txt").read_text()  # said when the run starts (printed with progress)
    assert (f"model.weights {str(path)!r}: loaded all but the classifier (fc.weight, fc.bias), which starts fresh "
            "for 10 classes (the file's was for 100)\n") in log
