"""Wide residual networks of the CRD benchmark (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko and Komodakis, "Wide Residual Networks" (BMVC 2016): a 3x3 stem and three stages of pre-activation
blocks (BN, ReLU, conv) at 16k/32k/64k channels, depth 6n+4, dropout off. Module names follow
HobbitLong/RepDistiller:models/wrn.py so its checkpoints load strictly. Stage outputs are the raw residual sums;
only the pooled vector passes the final BN and ReLU. Global pooling is adaptive, which equals the reference
avg-pool of size 8 at 32x32 and also serves 64x64 inputs.
"""
from __future__ import annotations

from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class BasicBlock(nn.Module):
    """Pre-activation unit: BN-ReLU-conv3x3 twice; a 1x1 `convShortcut` when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.convShortcut = (
            None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        # As in the reference, a projection shortcut sees the activated input, an identity one the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + self.conv2(self.relu2(self.bn2(self.conv1(act))))


class NetworkBlock(nn.Module):
    """One stage: `layer` holds its units (the name is part of the reference state_dict keys)."""

    def __init__(self, units: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            BasicBlock(in_planes, out_planes, stride),
            *(BasicBlock(out_planes, out_planes, 1) for _ in range(1, units)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: stem conv, three NetworkBlocks, BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        units = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(units, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(units, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(units, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn1(x))).reshape(x.size(0), -1)
        return self.fc(x)


@register_layout(WideResNet)
def _stages(model: WideResNet) -> list[Stage]:
    return [
        Stage("stem", [model.conv1], merge_into_next_block=True),
        # Pre-activation blocks: a stage's output is the raw residual sum; the BN before its ReLU is the next
        # block's bn1, the model's bn1 after the last stage (mdistiller's wrn `get_bn_before_relu`).
        *(
            Stage(f"stage{i}", list(block.layer), preact_bn=bn)
            for i, (block, bn) in enumerate(zip([model.block1, model.block2, model.block3],
                                                [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]), 1)
        ),
        Stage("pool", [nn.Sequential(model.bn1, model.relu, model.avgpool, Flatten())]),
        Stage("head", [model.fc]),
    ]


@register_model
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1 (2 units per stage, width 1)."""
    return WideResNet(16, 1, num_classes)


@register_model
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2 (2 units per stage, width 2)."""
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1 (6 units per stage, width 1)."""
    return WideResNet(40, 1, num_classes)


@register_model
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2 (6 units per stage, width 2)."""
    return WideResNet(40, 2, num_classes)
