"""The CRD benchmark's CIFAR ResNet50 (registered as `ResNet50`, the CRD model name).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), bottleneck ResNet-50 (stages of 3, 4, 6, 3
units at 64/128/256/512 x 4 channels) with a CIFAR stem: one 3x3 stride-1 conv and no max-pool. Module names
(`shortcut`, `linear`) follow HobbitLong/RepDistiller:models/resnetv2.py so its checkpoints load strictly; it is
not torchvision's resnet50 (see `adakd.models.imagenet.resnet`).
"""
from __future__ import annotations

from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, residual; `forward_preact` also returns the sum before ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity and adds no state_dict keys, as in the reference.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (block output, residual sum before the final ReLU)."""
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return preact.relu(), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class CifarBottleneckResNet(nn.Module):
    """Bottleneck ResNet with a CIFAR stem: conv3x3-BN-ReLU, four stages, adaptive pool, `linear`."""

    def __init__(self, blocks_per_stage: list[int], num_classes: int = 100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, blocks_per_stage[0], 1)
        self.layer2 = self._make_layer(128, blocks_per_stage[1], 2)
        self.layer3 = self._make_layer(256, blocks_per_stage[2], 2)
        self.layer4 = self._make_layer(512, blocks_per_stage[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        kaiming_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, block_stride))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).reshape(x.size(0), -1)
        return self.linear(x)


@register_layout(CifarBottleneckResNet)
def _stages(model: CifarBottleneckResNet) -> list[Stage]:
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    return [
        Stage("stem", [nn.Sequential(model.conv1, model.bn1, model.relu)], merge_into_next_block=True),
        *(Stage(f"stage{i}", list(layer), has_preact=True, preact_bn=layer[-1].bn3)
          for i, layer in enumerate(layers, 1)),
        Stage("pool", [nn.Sequential(model.avgpool, Flatten())]),
        Stage("head", [model.linear]),
    ]


@register_model
def ResNet50(num_classes: int = 100) -> CifarBottleneckResNet:  # noqa: N802  (the CRD model name)
    """CRD's CIFAR ResNet-50 (bottleneck units 3-4-6-3, 3x3 stem, no max-pool)."""
    return CifarBottleneckResNet([3, 4, 6, 3], num_classes)
