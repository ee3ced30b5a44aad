"""VGG networks with batch norm of the CRD benchmark (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015), CIFAR
variant of HobbitLong/RepDistiller:models/vgg.py (its `*_bn` factories): five blocks of 3x3 conv (with bias), BN,
ReLU, max-pools between them, global average pooling and one Linear `classifier`. Each block ends in BN; its last
ReLU runs outside the block, so the pre-activation of every stage is reachable. Module names follow the reference
so its checkpoints load strictly.

Departure: the reference applies `pool3` when the input is exactly 64 pixels high. The staged view only sees the
stage input, so `pool3` here pools maps of at least 8x8 (inputs of 64x64 or larger); the two agree at 32x32 (f3
and f4 both 4x4, no pool) and at 64x64, and differ only for inputs above 64 pixels, which no recipe uses.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout

_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class SizeGatedMaxPool(nn.Module):
    """2x2 max-pool applied only to maps at least `min_size` pixels wide (VGG's pool3); smaller ones pass."""

    def __init__(self, min_size: int = 8):
        super().__init__()
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, 2, 2) if x.size(-1) >= self.min_size else x


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN: block0..block4 (conv-BN-ReLU units, last ReLU outside), pool0..pool3, adaptive pool4, classifier."""

    def __init__(self, config: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(config[0], 3)
        self.block1 = _make_block(config[1], config[0][-1])
        self.block2 = _make_block(config[2], config[1][-1])
        self.block3 = _make_block(config[3], config[2][-1])
        self.block4 = _make_block(config[4], config[3][-1])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = SizeGatedMaxPool(8)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[-1][-1], num_classes)
        kaiming_init(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block0(x).relu()
        x = self.block1(self.pool0(x)).relu()
        x = self.block2(self.pool1(x)).relu()
        x = self.block3(self.pool2(x)).relu()
        x = self.block4(self.pool3(x)).relu()
        x = self.pool4(x).reshape(x.size(0), -1)
        return self.classifier(x)


def _conv_units(block: nn.Sequential, pool: nn.Module | None) -> list[nn.Sequential]:
    """Split a block into ABL units (conv, BN, ReLU); the stage's pool joins the first unit.

    The block's last unit gets a fresh out-of-place ReLU, the one the model's forward applies outside the block,
    so the staged view can hand out the BN output before it.
    """
    modules = list(block)
    units = [modules[start : start + 3] for start in range(0, len(modules), 3)]
    units[-1] = units[-1] + [nn.ReLU()]
    if pool is not None:
        units[0] = [pool] + units[0]
    return [nn.Sequential(*unit) for unit in units]


@register_layout(VGG)
def _stages(model: VGG) -> list[Stage]:
    pools = [model.pool0, model.pool1, model.pool2, model.pool3]
    blocks = [model.block1, model.block2, model.block3, model.block4]
    return [
        Stage("stem", _conv_units(model.block0, None)),
        *(
            Stage(f"stage{i}", _conv_units(block, pool), has_preact=True, preact_bn=block[-1])
            for i, (pool, block) in enumerate(zip(pools, blocks), 1)
        ),
        Stage("pool", [nn.Sequential(model.pool4, Flatten())]),
        Stage("head", [model.classifier]),
    ]


@register_model
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BN (one conv per block; CRD `vgg8_bn`)."""
    return VGG(_CONFIGS["vgg8"], num_classes)


@register_model
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BN (configuration A; CRD `vgg11_bn`)."""
    return VGG(_CONFIGS["vgg11"], num_classes)


@register_model
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (configuration B; CRD `vgg13_bn`)."""
    return VGG(_CONFIGS["vgg13"], num_classes)


@register_model
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BN (configuration D; CRD `vgg16_bn`)."""
    return VGG(_CONFIGS["vgg16"], num_classes)


@register_model
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BN (configuration E; CRD `vgg19_bn`)."""
    return VGG(_CONFIGS["vgg19"], num_classes)
