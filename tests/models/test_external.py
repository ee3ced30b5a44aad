"""timm and torchvision models by name, and the automatic staged view cut from their traced forward.

Every family is built once (module-scoped fixture), randomly initialised, at 32x32 with 5 classes.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adakd import models
from adakd.models.auto_staged import AutoLayoutError, GraphSegment
from adakd.models.checkpoint import CheckpointError
from adakd.registry import UnknownNameError

pytest.importorskip("timm")

CLASSES = 5
# name -> (create kwargs, number of residual blocks = ABL blocks, number of stages between stem and pool)
FAMILIES = {
    "timm:resnet10t": ({}, 4, 4),
    "timm:convnext_atto": ({}, 12, 4),
    "timm:mobilenetv3_small_050": ({}, 12, 4),  # 11 blocks + the last 1x1 ConvBnAct (blocks.5)
    "timm:regnetx_002": ({}, 13, 4),
    "timm:vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 4}, 12, 4),
    "torchvision:resnet18": ({}, 8, 4),  # torchvision's ResNet class has the hand-written layout
    "torchvision:mobilenet_v3_small": ({}, 12, 4),  # 11 inverted residuals + the last 1x1 conv
}


def _build(name: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return models.create(name, num_classes=CLASSES, **FAMILIES[name][0], **extra).eval()


def _input(channels: int = 3) -> Tensor:
    return torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(name: str) -> nn.Module:
    return _build(name)


@pytest.fixture(scope="module")
def view(model: nn.Module) -> models.StagedModel:
    return models.staged(model)


@torch.no_grad()
def test_segments_compose_to_the_forward(model: nn.Module, view: models.StagedModel) -> None:
    x = _input()
    logits = model(x)
    assert torch.equal(view.run(x), logits)
    features = view(x).features
    for k in range(1, view.num_stages):  # continue from every stage's input
        assert torch.equal(view.run(view.run(x, 0, k - 1), k, -1), logits), view.stage_names[k]
        assert torch.equal(view.run(features[k - 1], k, k), features[k])


@torch.no_grad()
def test_features_have_the_measured_shapes(name: str, model: nn.Module, view: models.StagedModel) -> None:
    _, _, stages = FAMILIES[name]
    shapes = view.feature_shapes((3, 32, 32))
    assert view.stage_names == ["stem", *(f"stage{k}" for k in range(1, stages + 1)), "pool", "head"]
    assert [tuple(f.shape[1:]) for f in view(_input()).features] == shapes
    assert shapes[-1] == (CLASSES,) and len(shapes[-2]) == 1  # the pooled vector is B x C
    if "vit" in name:
        assert all(shape == (65, 192) for shape in shapes[:-2])  # tokens kept as B x N x C (64 patches + cls)
    else:
        sides = [shape[-1] for shape in shapes[1:-2]]
        assert len(shapes[0]) == 3 and sides == sorted(sides, reverse=True) and sides[-1] < sides[0]
    if name.startswith("timm:"):
        x = _input()
        # The pool stage is timm's own pre-logits output.
        assert torch.equal(view(x).features[-2], model.forward_head(model.forward_features(x), pre_logits=True))


@torch.no_grad()
def test_timm_stage_features_match_forward_intermediates(name: str, model: nn.Module,
                                                         view: models.StagedModel) -> None:
    if not name.startswith("timm:") or "vit" in name:
        pytest.skip("timm CNNs only: forward_intermediates returns the feature_info stages")
    x = _input()
    stages = view(x).features[1:-2]
    reference = model.forward_intermediates(x, intermediates_only=True)[-len(stages):]
    for ours, theirs in zip(stages, reference):
        assert torch.equal(ours, theirs)


@torch.no_grad()
def test_abl_blocks_compose_and_partition(name: str, model: nn.Module, view: models.StagedModel) -> None:
    blocks = view.blocks()
    assert len(blocks) == FAMILIES[name][1] == len(view.block_end_stages())
    owners = Counter(id(p) for block in blocks for p in block.parameters())
    assert set(owners) == {id(p) for p in model.parameters()} and set(owners.values()) == {1}
    out = x = _input()
    for block in blocks:
        out = block(out)
    assert torch.equal(out, model(x))


def test_parameters_are_shared_and_keys_unchanged(name: str, model: nn.Module, view: models.StagedModel) -> None:
    own = {p.data_ptr() for p in model.parameters()}
    for stage in view.stages:
        for block in stage.blocks:
            assert {p.data_ptr() for p in block.parameters()} <= own
    assert list(view.model.state_dict()) == list(_build(name, seed=1).state_dict())
    assert list(view.state_dict()) == [f"model.{key}" for key in model.state_dict()]
    assert all(p.data_ptr() in own for p in view.parameters())


def test_segments_follow_the_model_mode() -> None:
    """timm bakes `F.dropout(training=self.training)` into the trace; each mode must get its own graph."""
    torch.manual_seed(0)
    model = models.create("timm:resnet10t", num_classes=CLASSES, drop_rate=0.5)
    view = models.staged(model).train()
    x = _input()
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(view.run(x), expected)
    view.eval()
    with torch.no_grad():
        assert torch.equal(view.run(x), model(x))
        assert not torch.equal(view.run(x), expected), "dropout did not run in train mode"
    assert isinstance(view.stages[-2].blocks[0], GraphSegment)


def test_frozen_teacher_view() -> None:
    teacher = models.frozen(_build("timm:convnext_atto").train())
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    x = _input()
    assert torch.equal(teacher(x).features[-1], teacher.model(x))


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:mobilenet_v3_small"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_loads_strictly(name: str, suffix: str, tmp_path: Path) -> None:
    saved = _build(name, seed=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(saved.state_dict(), str(path))
    else:
        torch.save(saved.state_dict(), path)
    fresh = _build(name, seed=2)
    x = _input()
    with torch.no_grad():
        assert not torch.equal(fresh(x), saved(x))
        models.load_weights(fresh, path, model_name=name)
        assert torch.equal(fresh(x), saved(x))


def test_safetensors_of_another_architecture_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file(_build("timm:regnetx_002").state_dict(), str(path))
    with pytest.raises(CheckpointError, match="missing keys"):
        models.load_weights(_build("timm:resnet10t"), path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        models.load_weights(_build("timm:resnet10t"), path)


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:mobilenet_v3_small", "torchvision:resnet18"])
@torch.no_grad()
def test_one_input_channel(name: str) -> None:
    model = _build(name, in_chans=1)
    view, x = models.staged(model), _input(channels=1)
    assert torch.equal(view.run(x), model(x))
    assert view.feature_shapes((1, 32, 32))[-1] == (CLASSES,)
    with pytest.raises(RuntimeError):
        model(_input(channels=3))


def test_torchvision_weights_go_through_pretrained() -> None:
    """torchvision's own `weights=` builder argument would bypass adakd's classifier resizing and safe loading;
    pretrained weights themselves are tested offline in test_pretrained.py."""
    with pytest.raises(models.ModelSourceError, match=r"give the weights as pretrained=NAME"):
        models.create("torchvision:resnet18", weights="DEFAULT")
    assert isinstance(models.create("timm:resnet10t", num_classes=3, pretrained=False), nn.Module)


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'timm:convnext_atto'"):
        models.create("timm:convnext_ato")
    with pytest.raises(UnknownNameError, match="Did you mean 'torchvision:resnet18'"):
        models.create("torchvision:resnet19")
    with pytest.raises(UnknownNameError, match="unknown model source 'tim'"):
        models.create("tim:resnet18")


def test_missing_timm_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(models.ModelSourceError, match=r'pip install "adakd\[timm\]"') as error:
        models.create("timm:resnet10t")
    assert "\n" not in str(error.value)


def test_available_by_source() -> None:
    assert "timm:convnext_atto" in models.available("convnext_*", source="timm")
    assert models.available("mobilenet_v3*", source="torchvision") == ["torchvision:mobilenet_v3_large",
                                                                      "torchvision:mobilenet_v3_small"]
    assert "resnet8" in models.available() and not any(":" in n for n in models.available())


class _Plain(nn.Module):
    """A user model with ResNet-style `layer1..N`: staged automatically."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3)))


class _CrossingSkip(_Plain):
    """The stem output skips both stages, so no single tensor crosses the stage boundaries."""

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        return self.fc(self.layer2(self.layer1(stem)).mean((2, 3)) + stem.mean((1, 2, 3))[:, None])


class _DataDependent(_Plain):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.stem(x))
        if x.sum() > 0:
            x = x * 2
        return self.fc(self.layer2(x).mean((2, 3)))


@torch.no_grad()
def test_own_model_is_staged_automatically() -> None:
    model = _Plain().eval()
    view = models.staged(model)
    assert view.feature_shapes() == [(8, 32, 32), (8, 32, 32), (16, 16, 16), (16,), (CLASSES,)]
    assert len(view.blocks()) == 3 and torch.equal(view.run(_input()), model(_input()))


@pytest.mark.parametrize(("cls", "reason"), [(_CrossingSkip, "cannot be cut after its block 'layer1.0': 2 values cross"),
                                              (_DataDependent, "torch.fx cannot trace")])
def test_unsplittable_model_names_the_reason(cls: type, reason: str) -> None:
    with pytest.raises(AutoLayoutError) as error:
        models.staged(cls())
    message = str(error.value)
    assert reason in message and f"@adakd.models.register_layout({cls.__name__})" in message
    assert isinstance(error.value, TypeError)
