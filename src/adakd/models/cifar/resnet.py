"""CIFAR ResNets of the CRD benchmark (resnet8 ... resnet110, resnet8x4, resnet32x4).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), CIFAR variant: a 3x3 stem and three
stages of BasicBlocks at 16/32/64 channels (x4: 32 -> 64/128/256). Module names follow
HobbitLong/RepDistiller:models/resnet.py so its checkpoints load strictly. Global pooling is adaptive, which
equals the reference AvgPool2d(8) at 32x32 and also serves 64x64 inputs (tiny-ImageNet).
"""
from __future__ import annotations

from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; `forward_preact` also returns the sum before ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (block output, residual sum before the final ReLU)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + identity
        return preact.relu(), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class CifarResNet(nn.Module):
    """CIFAR ResNet: stem, three stages of `blocks_per_stage` BasicBlocks, pool, fc."""

    def __init__(self, blocks_per_stage: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], blocks_per_stage, 1)
        self.layer2 = self._make_layer(widths[2], blocks_per_stage, 2)
        self.layer3 = self._make_layer(widths[3], blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).reshape(x.size(0), -1)
        return self.fc(x)


@register_layout(CifarResNet)
def _stages(model: CifarResNet) -> list[Stage]:
    return [
        Stage("stem", [nn.Sequential(model.conv1, model.bn1, model.relu)], merge_into_next_block=True),
        *(
            Stage(f"stage{i}", list(layer), has_preact=True, preact_bn=layer[-1].bn2)
            for i, layer in enumerate([model.layer1, model.layer2, model.layer3], 1)
        ),
        Stage("pool", [nn.Sequential(model.avgpool, Flatten())]),
        Stage("head", [model.fc]),
    ]


def _resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int) -> CifarResNet:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, widths, num_classes)


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 for CIFAR (1 block per stage)."""
    return _resnet(8, _THIN, num_classes)


@register_model
def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14 for CIFAR (2 blocks per stage)."""
    return _resnet(14, _THIN, num_classes)


@register_model
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage)."""
    return _resnet(20, _THIN, num_classes)


@register_model
def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage)."""
    return _resnet(32, _THIN, num_classes)


@register_model
def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage)."""
    return _resnet(44, _THIN, num_classes)


@register_model
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage)."""
    return _resnet(56, _THIN, num_classes)


@register_model
def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage)."""
    return _resnet(110, _THIN, num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 with 4x wider stages (32 -> 64/128/256 channels)."""
    return _resnet(8, _X4, num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with 4x wider stages (32 -> 64/128/256 channels)."""
    return _resnet(32, _X4, num_classes)
