"""ABL's auxiliary heads (spec §4): shapes on every student's blocks, structure, parameter counts, gradients.

That `StagedModel.blocks()` partitions every model into `abl_blocks` blocks is tested in tests/models/test_zoo.py.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from adakd import models
from markers import slow_except
from adakd.engine.config import load_preset, preset_names
from adakd.models.cifar.mobilenetv2 import InvertedResidual
from adakd.strategies.abl_heads import AUX_KINDS, build_aux_head, build_aux_heads, measure_block_shapes

ZOO_TSV = Path(__file__).parents[1] / "models" / "model_zoo.tsv"
with ZOO_TSV.open(newline="") as _handle:
    ZOO = {row["name"]: row for row in csv.DictReader(_handle, delimiter="\t")}


def _teacher_only() -> set[str]:
    """Models that the shipped pair presets use only as teachers: ABL never puts heads on them."""
    pairs = [load_preset(name) for name in preset_names() if name.startswith("pair-")]
    return {p["teacher"]["name"] for p in pairs} - {p["model"]["name"] for p in pairs}


# Teachers are skipped to keep the file fast: aux2 on ResNet50's 2048-channel blocks alone holds ~800 M weights.
STUDENTS = [name for name in models.available() if name not in _teacher_only()]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _logits_with_untouched_input(head: nn.Module, feature: torch.Tensor) -> torch.Tensor:
    """Run a head on a detached copy, as ABL's sweep does, and check it never writes into that copy."""
    plain = feature.detach()
    version = plain._version
    with torch.no_grad():  # without autograd only the version counter notices an in-place write
        head(plain)
    assert plain._version == version, "the head modified the block output in place"
    copy = feature.detach().requires_grad_()
    logits = head(copy)
    logits.sum().backward()
    assert copy.grad is not None
    return logits


def test_some_students_are_checked() -> None:
    assert {"resnet20", "resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "resnet18",
            "mobilenetv1"} <= set(STUDENTS)
    # wrn_40_2 is a student too: LS's pair resnet32x4 -> wrn_40_2 (preset pair-resnet32x4-wrn_40_2).
    assert not {"resnet110", "resnet32x4", "vgg13", "ResNet50", "resnet34", "resnet50"} & set(STUDENTS)
    assert "wrn_40_2" in STUDENTS


# The inner loop keeps one model of each family (CIFAR ResNet, VGG, MobileNet, ShuffleNet, WRN, ImageNet ResNet).
@pytest.mark.parametrize("name", slow_except(STUDENTS, ["resnet8", "vgg8", "MobileNetV2", "ShuffleV2", "wrn_16_2", "resnet18"]))
def test_every_head_kind_gives_logits_on_every_block(name: str) -> None:
    row = ZOO[name]
    side, num_classes = int(row["input_hw"]), int(row["num_classes"])
    blocks = models.staged(models.create(name, num_classes=num_classes)).blocks()
    # One representative block output per distinct shape: heads depend only on the shape.
    x, by_shape, shapes = torch.randn(2, 3, side, side), {}, []
    with torch.no_grad():
        for block in blocks[:-1]:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
            by_shape.setdefault(shapes[-1], x)
    assert len(shapes) == int(row["abl_blocks"]) - 1
    assert measure_block_shapes(blocks, (3, side, side)) == shapes
    for kind in AUX_KINDS:
        for shape, feature in by_shape.items():
            head = build_aux_head(kind, shape, num_classes)
            assert _logits_with_untouched_input(head, feature).shape == (2, num_classes), (kind, shape)


def test_measure_block_shapes_keeps_each_module_mode() -> None:
    view = models.staged(models.create("resnet8"))
    view.model.train()
    view.model.layer2.eval()
    assert measure_block_shapes(view.blocks(), (3, 32, 32)) == [(16, 32, 32), (32, 16, 16)]
    assert view.model.training and view.model.layer1.training and not view.model.layer2.training


def test_build_aux_heads_makes_one_head_per_shape() -> None:
    heads = build_aux_heads("aux3", [(16, 32, 32), (32, 16, 16)], num_classes=10)
    assert isinstance(heads, nn.ModuleList) and len(heads) == 2
    assert heads[1][0].in_channels == 32 and heads[1][-1].out_features == 10


def test_aux3_structure() -> None:
    head = build_aux_head("aux3", (16, 32, 32), num_classes=100)
    assert [type(m) for m in head] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU,
        nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear,
    ]
    pointwise, depthwise, fc = head[0], head[3], head[8]
    assert (pointwise.in_channels, pointwise.out_channels, pointwise.kernel_size) == (16, 16, (1, 1))
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (16, 16, 16)
    assert (depthwise.kernel_size, depthwise.stride, depthwise.padding) == ((3, 3), (2, 2), (1, 1))
    assert pointwise.bias is None and depthwise.bias is None
    assert (fc.in_features, fc.out_features) == (16, 100)


def test_aux3_parameter_count_by_hand() -> None:
    # pw 16*16, BN 2*16, dw 16*3*3, BN 2*16, FC 16*100 + 100.
    assert _params(build_aux_head("aux3", (16, 32, 32), num_classes=100)) == 256 + 32 + 144 + 32 + 1600 + 100
    # width 32: pw 16*32, BN 2*32, dw 32*3*3, BN 2*32, FC 32*100 + 100.
    assert _params(build_aux_head("aux3", (16, 32, 32), 100, width=32)) == 512 + 64 + 288 + 64 + 3200 + 100


def test_aux1_and_aux2_parameter_counts_by_hand() -> None:
    assert _params(build_aux_head("aux1", (64, 8, 8), num_classes=100)) == 64 * 100 + 100
    # aux2 on 16x32x32: pool to 8x8, 3 x (pw 16*16 + BN 32), pool to 2x2 -> 64 features,
    # 3 x (64*64 + BN 128), FC 64*100 + 100.
    head = build_aux_head("aux2", (16, 32, 32), num_classes=100)
    assert _params(head) == 3 * (256 + 32) + 3 * (4096 + 128) + 6500
    pools = [m.output_size for m in head if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert pools == [(8, 8), (2, 2)]
    # 4x4 maps: ceil(4/4) = 1, so both pools give 1x1 and the MLP is C wide.
    pools = [m.output_size for m in build_aux_head("aux2", (32, 4, 4), 10) if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert pools == [(1, 1), (1, 1)]


def test_aux4_adds_an_inverted_residual_with_identity() -> None:
    head = build_aux_head("aux4", (16, 32, 32), num_classes=10)
    blocks = [m for m in head if isinstance(m, InvertedResidual)]
    assert len(blocks) == 1 and blocks[0].use_residual
    block = blocks[0]
    assert block.conv[0].out_channels == 4 * 16 and block.conv[3].stride == (1, 1)
    # With the projection's BN zeroed, the branch adds nothing: the block is the identity only if it adds x.
    nn.init.zeros_(block.conv[-1].weight)
    nn.init.zeros_(block.conv[-1].bias)
    x = torch.randn(2, 16, 16, 16)
    assert torch.equal(block(x), x)
    assert _params(head) == _params(build_aux_head("aux3", (16, 32, 32), 10)) + _params(block)


@pytest.mark.parametrize("kind", AUX_KINDS)
def test_final_dim_expands_before_the_last_pool(kind: str) -> None:
    head = build_aux_head(kind, (16, 8, 8), num_classes=10, final_dim=48)
    last_pool = max(i for i, m in enumerate(head) if isinstance(m, nn.AdaptiveAvgPool2d))
    expand, bn = head[last_pool - 3], head[last_pool - 2]
    assert isinstance(expand, nn.Conv2d) and expand.out_channels == 48 and expand.kernel_size == (1, 1)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(head[last_pool - 1], nn.ReLU)
    assert _logits_with_untouched_input(head, torch.randn(2, 16, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("final_dim", [None, 24])
@pytest.mark.parametrize("kind", AUX_KINDS)
def test_every_head_parameter_gets_a_gradient(kind: str, final_dim: int | None) -> None:
    width = None if kind == "aux1" else 8
    head = build_aux_head(kind, (16, 8, 8), num_classes=10, width=width, final_dim=final_dim).train()
    logits = head(torch.randn(4, 16, 8, 8))
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for param_name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


def test_vector_block_output_takes_only_a_linear_head() -> None:
    head = build_aux_head("aux1", (64,), num_classes=10)
    assert [type(m) for m in head] == [nn.Linear]
    assert head(torch.randn(2, 64)).shape == (2, 10)
    for kind in ("aux2", "aux3", "aux4"):
        with pytest.raises(ValueError, match="use aux1"):
            build_aux_head(kind, (64,), num_classes=10)
    with pytest.raises(ValueError, match="final_dim"):
        build_aux_head("aux1", (64,), num_classes=10, final_dim=128)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="aux1, aux2, aux3, aux4"):
        build_aux_head("aux5", (16, 8, 8), 10)
    with pytest.raises(ValueError, match="width does not apply"):
        build_aux_head("aux1", (16, 8, 8), 10, width=32)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_aux_head("aux3", (2, 16, 8, 8), 10)
    with pytest.raises(ValueError, match="final_dim"):
        build_aux_head("aux3", (16, 8, 8), 10, final_dim=0)
