"""mdistiller's ImageNet MobileNetV1 (registered as `mobilenetv1`), the student of ResNet-50 -> MobileNetV1.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications" (2017), width
1.0: a stride-2 3x3 conv then 13 depth-wise separable units (3x3 depth-wise conv-BN-ReLU, 1x1 conv-BN-ReLU, no
biases). Module names follow megvii-research/mdistiller:mdistiller/models/imagenet/mobilenetv1.py (`model.N.M`,
`fc`) so its checkpoints load strictly. Departures: the reference's AvgPool2d(7) is adaptive here (equal at 224x224,
and no key changes), and `fc` takes `num_classes` where the reference fixes 1000. Like the reference, weights keep
PyTorch's default initialisation.
"""
from __future__ import annotations

from torch import Tensor, nn

from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout

# (output channels, stride) of the 13 depth-wise separable units.
_UNITS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
# Units (indices into `model`) ending each stage: the reference's feature points after model.3, 5, 11 and 13.
_STAGE_ENDS = [3, 5, 11, 13]


def _conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _conv_dw(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1: `model` = stem conv, 13 separable units, global pool; then `fc`."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        units: list[nn.Module] = [_conv_bn(3, 32, 2)]
        in_channels = 32
        for out_channels, stride in _UNITS:
            units.append(_conv_dw(in_channels, out_channels, stride))
            in_channels = out_channels
        self.model = nn.Sequential(*units, nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.model(x)
        return self.fc(x.reshape(x.size(0), -1))


@register_layout(MobileNetV1)
def _stages(model: MobileNetV1) -> list[Stage]:
    starts = [1] + [end + 1 for end in _STAGE_ENDS[:-1]]
    return [
        Stage("stem", [model.model[0]], merge_into_next_block=True),
        *(
            Stage(f"stage{i}", list(model.model[start : end + 1]), has_preact=True)
            for i, (start, end) in enumerate(zip(starts, _STAGE_ENDS), 1)
        ),
        Stage("pool", [nn.Sequential(model.model[-1], Flatten())]),
        Stage("head", [model.fc]),
    ]


@register_model
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 for ImageNet (width 1.0, 224x224 input; mdistiller's student)."""
    return MobileNetV1(num_classes)
