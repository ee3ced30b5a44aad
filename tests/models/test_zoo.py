"""Every registered model against the reference table model_zoo.tsv (a copy of shared/reference/model-zoo.tsv).

The tests parametrise over `adakd.models.available()`, so a new registration is covered without edits and a model
without a table row fails. A module-scoped fixture builds each model once; pytest groups the tests by model, so
only one model is alive at a time.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from adakd import models
from markers import slow_except
from adakd.models.checkpoint import CheckpointError
from adakd.registry import UnknownNameError
from tiny_run import save_random_teacher

ZOO_TSV = Path(__file__).with_name("model_zoo.tsv")
# Families whose stage outputs are post-ReLU, so their pre-activations differ from the features.
POST_RELU_FAMILIES = {
    "cifar_resnet",
    "cifar_resnet_bottleneck",
    "vgg_bn",
    "shufflenetv1",
    "shufflenetv2",
    "imagenet_resnet",
    "imagenet_mobilenetv1",
}


def _read_zoo() -> dict[str, dict[str, str]]:
    with ZOO_TSV.open(newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle, delimiter="\t")}


ZOO = _read_zoo()


def _feature_shapes(row: dict[str, str]) -> list[tuple[str, tuple[int, ...]]]:
    """Parse 'f0:16x32x32 | ... | f4:64' into [(label, shape), ...]."""
    entries = []
    for entry in row["feat_shapes"].split("|"):
        label, shape = entry.strip().split(":")
        entries.append((label, tuple(int(size) for size in shape.split("x"))))
    return entries


def _input(row: dict[str, str]) -> Tensor:
    """A seeded batch of 2; ImageNet models run at 64x64 where no shape is asserted, to keep the suite fast."""
    side = 64 if row["input_hw"] == "224" else int(row["input_hw"])
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


def _build(name: str, row: dict[str, str], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, num_classes=int(row["num_classes"])).eval()


# The inner loop checks one model of each family (CIFAR ResNet, VGG, MobileNet, ShuffleNet, WRN, ImageNet ResNet);
# CI checks all of them.
@pytest.fixture(scope="module", params=slow_except(models.available(), ["resnet8", "vgg8", "MobileNetV2", "ShuffleV2",
                                                                       "wrn_16_2", "resnet18"]))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def row(name: str) -> dict[str, str]:
    assert name in ZOO, f"model {name!r} is registered but has no row in {ZOO_TSV.name}; add one"
    return ZOO[name]


@pytest.fixture(scope="module")
def model(name: str, row: dict[str, str]) -> nn.Module:
    return _build(name, row)


def test_parameter_count(model: nn.Module, row: dict[str, str]) -> None:
    assert sum(p.numel() for p in model.parameters()) == int(row["params"])


def test_feature_shapes(model: nn.Module, row: dict[str, str]) -> None:
    side = int(row["input_hw"])
    shapes = models.staged(model).feature_shapes((3, side, side))
    expected = _feature_shapes(row)
    # mdistiller's MobileNetV1 lists no stem feature; compare the ones the table has.
    measured = shapes[:-1] if expected[0][0] == "f0" else shapes[1:-1]
    assert measured == [shape for _, shape in expected]
    assert shapes[-1] == (int(row["num_classes"]),)
    assert not any(module.training for module in model.modules()), "feature_shapes changed the model's mode"


@torch.no_grad()
def test_staged_view_reproduces_logits(model: nn.Module, row: dict[str, str]) -> None:
    view, x = models.staged(model), _input(row)
    logits = model(x)
    assert torch.equal(logits, view.run(x))
    middle = view.num_stages // 2
    assert torch.equal(logits, view.run(view.run(x, 0, middle - 1), middle, -1))


@torch.no_grad()
def test_abl_blocks_partition_the_model(model: nn.Module, row: dict[str, str]) -> None:
    view, x = models.staged(model), _input(row)
    blocks = view.blocks()
    assert len(blocks) == int(row["abl_blocks"])
    owners = Counter(id(p) for block in blocks for p in block.parameters())
    assert set(owners) == {id(p) for p in model.parameters()}
    assert set(owners.values()) == {1}
    assert len(view.block_end_stages()) == len(blocks)
    out = x
    for block in blocks:
        out = block(out)
    assert torch.equal(out, model(x))


def test_state_dict_keys(model: nn.Module, row: dict[str, str]) -> None:
    state = model.state_dict()
    assert len(state) == int(row["state_dict_entries"])
    names = {id(p): key for key, p in model.named_parameters()}
    head = models.staged(model).stages[-1]
    head_keys = sorted(names[id(p)] for block in head.blocks for p in block.parameters())
    assert head_keys == sorted(row["classifier_keys"].split(","))
    assert all(key in state for key in head_keys)


@torch.no_grad()
def test_preact(model: nn.Module, row: dict[str, str]) -> None:
    view, x = models.staged(model), _input(row)
    plain, with_preact = view(x), view(x, preact=True)
    for feature, same in zip(plain.features, with_preact.features):
        assert torch.equal(feature, same)
    assert torch.equal(with_preact.features[-1], model(x))
    preact_stages = [k for k, stage in enumerate(view.stages) if stage.has_preact]
    if row["family"] not in POST_RELU_FAMILIES:
        for feature, preact in zip(with_preact.features, with_preact.preacts):
            assert torch.equal(feature, preact)
        return
    assert preact_stages, "a post-ReLU family must mark the stages that expose a pre-activation"
    for k in preact_stages:
        preact, feature = with_preact.preacts[k], with_preact.features[k]
        assert (preact < 0).any(), f"stage {view.stage_names[k]}: pre-activation has no negatives"
        # ShuffleV2's pre-activation precedes the channel shuffle (tests/models/test_mobile_shuffle.py covers it).
        if row["family"] != "shufflenetv2":
            assert torch.equal(preact.relu(), feature)


def test_crd_checkpoint_round_trip(name: str, model: nn.Module, row: dict[str, str], tmp_path: Path) -> None:
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(
        {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(70.0), "optimizer": sgd.state_dict()},
        path,
    )
    fresh = _build(name, row, seed=1)
    models.load_weights(fresh, path)
    x = _input(row)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    ("saved", "loaded", "named_keys"),
    [
        ("wrn_16_1", "resnet8", ["missing keys", "unexpected keys", "layer1.0.conv1.weight", "block1.layer.0.bn1"]),
        ("vgg8", "vgg13", ["missing keys", "block0.3.weight"]),
        ("ResNet50", "resnet50", ["missing keys", "unexpected keys", "shape mismatches", "downsample", "shortcut"]),
    ],
)
def test_checkpoint_of_another_architecture_is_refused(
    saved: str, loaded: str, named_keys: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "other.pth"
    save_random_teacher(path, saved, num_classes=100, epoch=240)
    with pytest.raises(CheckpointError) as error:
        models.load_weights(models.create(loaded, num_classes=100), path)
    for key in named_keys:
        assert key in str(error.value)


def _write_marker(path: str) -> None:
    Path(path).write_text("arbitrary code ran while unpickling")


class _Payload:
    """Unpickling this object calls `_write_marker`: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return _write_marker, (os.fspath(self.marker),)


def test_pickled_object_is_refused_without_running(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker.txt", tmp_path / "evil.pth"
    state = models.create("resnet8").state_dict()
    torch.save({"epoch": 240, "model": state, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        models.load_weights(models.create("resnet8"), path)
    assert not marker.exists()
    # The payload is live: a plain unpickler does run it, so the refusal above is what kept the marker away.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_raises(tmp_path: Path) -> None:
    full, cut = tmp_path / "full.pth", tmp_path / "cut.pth"
    torch.save({"model": models.create("resnet8").state_dict()}, full)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        models.load_weights(models.create("resnet8"), cut)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strictly(arch: str, tmp_path: Path) -> None:
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    ours = models.create(arch, num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    from_file = models.load_weights(models.create(arch, num_classes=1000), path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_file(x), reference(x))


def test_feature_shapes_keeps_each_module_mode() -> None:
    model = models.create("resnet8").train()
    model.layer2.eval()
    models.staged(model).feature_shapes()
    assert model.training and model.layer1.training and not model.layer2.training


@torch.no_grad()
def test_vgg_pool3_runs_only_at_64x64() -> None:
    model = models.create("vgg8").eval()
    view = models.staged(model)
    assert view.feature_shapes((3, 32, 32))[3:5] == [(512, 4, 4), (512, 4, 4)]
    assert view.feature_shapes((3, 64, 64))[3:5] == [(512, 8, 8), (512, 4, 4)]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), view.run(x))


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownNameError) as error:
        models.create("resnet21")
    suggestion = str(error.value).split("Available")[0]
    assert "Did you mean" in suggestion and "'resnet20'" in suggestion
