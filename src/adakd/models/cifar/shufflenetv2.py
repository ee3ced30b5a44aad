"""CIFAR ShuffleNetV2 of the CRD benchmark (`ShuffleV2`: net size 1, 116/232/464 channels, 1024 before pooling).

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design" (ECCV 2018), in the CIFAR
form of HobbitLong/RepDistiller:models/ShuffleNetv2.py: a 1x1 stem to 24 channels, three stages each made of a
stride-2 down unit (two branches, conv1..conv5) and basic units (half the channels pass through, the other half
go through 1x1 / 3x3 depthwise / 1x1 convs), a channel shuffle after every unit, a 1x1 conv to 1024 channels,
pooling and a linear classifier. Module names follow the reference so its checkpoints load strictly. Global
pooling is adaptive: equal to the reference avg_pool2d(4) at 32x32, and it also serves 64x64 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class BasicUnit(nn.Module):
    """Split the channels in halves, transform the second half, concatenate, shuffle.

    `forward_preact` returns the concatenation before the ReLU of the transformed part and before the channel
    shuffle (the CRD code's pre-activation), so its channel order differs from the unit output.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.split = channels // 2
        branch = channels - self.split
        self.conv1 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = nn.Conv2d(branch, branch, 3, 1, 1, groups=branch, bias=False)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = nn.Conv2d(branch, branch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (unit output, pre-ReLU concatenation before the channel shuffle)."""
        kept, transformed = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        preact = torch.cat([kept, out], 1)
        return F.channel_shuffle(torch.cat([kept, out.relu()], 1), 2), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class DownUnit(nn.Module):
    """Stride-2 unit: a depthwise branch (conv1, conv2) and a bottleneck branch (conv3..conv5), concatenated."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return F.channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs: 1x1 stem, three stages (down unit + basic units), conv2, pool, linear."""

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(24, out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[0], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[1], out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        kaiming_init(self)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
        return nn.Sequential(DownUnit(in_channels, out_channels), *(BasicUnit(out_channels) for _ in range(blocks)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(x).reshape(x.size(0), -1)
        return self.linear(x)


@register_layout(ShuffleNetV2)
def _stages(model: ShuffleNetV2) -> list[Stage]:
    return [
        Stage("stem", [nn.Sequential(model.conv1, model.bn1, model.relu)], merge_into_next_block=True),
        *(
            Stage(f"stage{i}", list(layer), has_preact=True)
            for i, layer in enumerate([model.layer1, model.layer2, model.layer3], 1)
        ),
        Stage("pool", [nn.Sequential(model.conv2, model.bn2, model.relu, model.avgpool, Flatten())]),
        Stage("head", [model.linear]),
    ]


@register_model
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # noqa: N802
    """ShuffleNetV2 for CIFAR (net size 1: 116/232/464 channels, 3/7/3 basic units, 1024 before pooling)."""
    return ShuffleNetV2(num_classes=num_classes)
