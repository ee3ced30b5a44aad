"""CIFAR MobileNetV2 of the CRD benchmark (`MobileNetV2`, width 0.5) and the SAKD code (`mobilev2`, width 1.0).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018), in the CIFAR form of
HobbitLong/RepDistiller:models/mobilenetv2.py (factory `mobile_half`) and
zju-vipa/spot-adaptive-pytorch:models/mobilenetv2.py (factory `mobilev2`): a stride-2 3x3 stem, seven groups of
inverted residuals (expansion 6, the first group 1), a 1x1 conv to 1280 channels, pooling and a linear
classifier. Module names follow the reference so its checkpoints load strictly. Both widths share every key name
but not the tensor shapes, so a checkpoint of one never loads into the other. Global pooling is adaptive: equal
to the CRD code's AvgPool2d(2) at 32x32, and it also serves 64x64 inputs. The reference constructor's print is
dropped.
"""
from __future__ import annotations

from torch import Tensor, nn

from adakd.models.layers import kaiming_init
from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout

# (output channels at width 1, units, stride of the first unit) per group of inverted residuals.
_SETTING = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expansion, 3x3 depthwise conv, linear pointwise projection; identity added when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs: stem, `blocks` (7 groups of inverted residuals), conv2, pool, classifier."""

    def __init__(self, num_classes: int = 100, width_mult: float = 1.0, expansion: int = 6):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for index, (channels, units, stride) in enumerate(_SETTING):
            out_channels = int(channels * width_mult)
            if min(in_channels, out_channels) < 1:
                raise ValueError(f"width_mult={width_mult} leaves a layer without channels; use a larger width")
            # The first group does not expand (t = 1 in the paper's Table 2).
            group_expansion = 1 if index == 0 else expansion
            layers = []
            for unit in range(units):
                layers.append(InvertedResidual(in_channels, out_channels, stride if unit == 0 else 1, group_expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        # The reference widens the last conv only above width 1, so both CRD and SAKD variants end in 1280.
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        kaiming_init(self)
        # The reference draws the classifier from N(0, 0.01) rather than PyTorch's uniform default.
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x)).reshape(x.size(0), -1)
        return self.classifier(x)


@register_layout(CifarMobileNetV2)
def _stages(model: CifarMobileNetV2) -> list[Stage]:
    # Stage outputs are linear-bottleneck outputs already, so there is no separate pre-activation.
    groups = [[0, 1], [2], [3, 4], [5, 6]]
    return [
        Stage("stem", [model.conv1], merge_into_next_block=True),
        *(
            Stage(f"stage{i}", [unit for g in indices for unit in model.blocks[g]],
                  preact_bn=model.blocks[indices[-1]][-1].conv[-1])
            for i, indices in enumerate(groups, 1)
        ),
        Stage("pool", [nn.Sequential(model.conv2, model.avgpool, Flatten())]),
        Stage("head", [model.classifier]),
    ]


@register_model
def MobileNetV2(num_classes: int = 100, width_mult: float = 0.5) -> CifarMobileNetV2:  # noqa: N802
    """The CRD benchmark's MobileNetV2 (`mobile_half`: width 0.5, expansion 6)."""
    return CifarMobileNetV2(num_classes, width_mult)


@register_model
def mobilev2(num_classes: int = 100, width_mult: float = 1.0) -> CifarMobileNetV2:
    """The SAKD code's MobileNetV2 (width 1.0, expansion 6)."""
    return CifarMobileNetV2(num_classes, width_mult)
