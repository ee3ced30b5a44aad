"""CIFAR ShuffleNet (v1) of the CRD benchmark (`ShuffleV1`: 3 groups, 240/480/960 channels, 4/8/4 units).

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices" (CVPR 2018),
in the CIFAR form of HobbitLong/RepDistiller:models/ShuffleNetv1.py: a 1x1 stem to 24 channels and three stages
of bottleneck units (grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv). The first unit of
each stage has stride 2 and concatenates a 3x3 average-pooled shortcut; the others add the identity. The very
first 1x1 conv uses 1 group because 24 input channels are too few to split (as in the paper and the reference).
Module names follow the reference so its checkpoints load strictly. Global pooling is adaptive: equal to the
reference avg_pool2d(4) at 32x32, and it also serves 64x64 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class ShuffleUnit(nn.Module):
    """ShuffleNet bottleneck unit; `forward_preact` also returns the sum (or concatenation) before ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid_planes = out_planes // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (unit output, pre-ReLU sum or concatenation)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        preact = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return preact.relu(), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 for 32x32 inputs: 1x1 stem, three stages of ShuffleUnits, pool, linear."""

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.in_planes = 24
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        kaiming_init(self)

    def _make_layer(self, out_planes: int, blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            # A stride-2 unit concatenates its input, so its branch makes only the missing channels.
            stride, branch_planes = (2, out_planes - self.in_planes) if i == 0 else (1, out_planes)
            first_groups = 1 if self.in_planes == 24 else groups
            layers.append(ShuffleUnit(self.in_planes, branch_planes, stride, groups, first_groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).reshape(x.size(0), -1)
        return self.linear(x)


@register_layout(ShuffleNetV1)
def _stages(model: ShuffleNetV1) -> list[Stage]:
    return [
        Stage("stem", [nn.Sequential(model.conv1, model.bn1, model.relu)], merge_into_next_block=True),
        *(
            Stage(f"stage{i}", list(layer), has_preact=True)
            for i, layer in enumerate([model.layer1, model.layer2, model.layer3], 1)
        ),
        Stage("pool", [nn.Sequential(model.avgpool, Flatten())]),
        Stage("head", [model.linear]),
    ]


@register_model
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # noqa: N802
    """ShuffleNet v1 for CIFAR (groups 3, 240/480/960 channels, 4/8/4 units)."""
    return ShuffleNetV1(num_classes=num_classes)
