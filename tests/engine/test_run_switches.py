"""Run switches users expect: threads, the evaluation cadence and the input channels of the models."""
from __future__ import annotations

import csv

import pytest
import torch

from adakd import models
from markers import slow_except
from adakd.engine.config import resolve
from adakd.engine.trainer import Trainer
from adakd.models.layers import with_input_channels
from tiny_run import TINY_RUN

def test_threads_sets_the_cpu_threads_of_the_run(tmp_path):
    before = torch.get_num_threads()
    try:
        Trainer(resolve(["cifar100", "demo"], None, [f"out_dir={tmp_path}", "threads=2", "data.image_size=8",
                                                     "data.train_size=64", "model.name=resnet8"]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_eval_every_scores_every_nth_epoch_and_always_the_last(tmp_path):
    trainer = Trainer(resolve(["cifar100", "demo"], None, [f"out_dir={tmp_path}", "name=r", *TINY_RUN, "epochs=5",
                                                           "log.eval_every=2"]))
    summary = trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    scored = [int(r["epoch"]) for r in rows if r.get("test/acc1")]
    assert scored == [2, 4, 5]
    assert summary["last_acc1"] == float(rows[-1]["test/acc1"]) and summary["best_epoch"] in scored


# The inner loop keeps one model of each family (CIFAR ResNet, VGG, MobileNet, ShuffleNet, WRN, ImageNet ResNet).
@pytest.mark.parametrize("name", slow_except(models.available(), ["resnet8", "vgg8", "MobileNetV2", "ShuffleV2", "wrn_16_2", "resnet18"]))
def test_every_zoo_model_takes_one_channel_images(name):
    imagenet = name in ("resnet18", "resnet34", "resnet50", "mobilenetv1")
    model = models.create(name, num_classes=5)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    gray = with_input_channels(models.create(name, num_classes=5), 1).eval()
    changed = {k for k, v in gray.state_dict().items() if v.shape != keys[k]}
    assert set(gray.state_dict()) == set(keys) and len(changed) == 1  # only the stem convolution's weight
    (key,) = changed
    assert gray.state_dict()[key].shape[1] == 1 and keys[key][1] == 3
    size = 64 if imagenet else 32
    assert gray(torch.randn(2, 1, size, size)).shape == (2, 5)
    view = models.staged(gray)
    assert view.feature_shapes((1, size, size))[-1] == (5,)


def test_a_grayscale_dataset_trains_one_channel_models(tmp_path, monkeypatch):
    from adakd import data

    def gray_digits(split, root=None, **options):
        colour = data.load_dataset("digits", split, **options)
        return data.ArrayDataset(colour.images[:, :1].contiguous(), colour.targets, classes=colour.classes,
                                 mean=colour.mean[:1], std=colour.std[:1], augment=colour.augment,
                                 crop_padding=colour.crop_padding)

    monkeypatch.setattr(data, "_MODULES", dict(data._MODULES))  # the registration ends with the test
    data.register_dataset("gray", gray_digits, info={**data.dataset_info("digits"), "channels": 1})
    trainer = Trainer(resolve(["cifar100", "demo"], None, [f"out_dir={tmp_path}", "name=g", *TINY_RUN,
                                                           "data.name=gray"]))
    assert trainer.student.model.conv1.weight.shape[1] == 1
    assert trainer.fit()["last_acc1"] > 0
