"""torchvision's ImageNet ResNets (resnet18, resnet34, resnet50) with a stage layout.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016). The builders instantiate torchvision's own
classes (torchvision/models/resnet.py) with `weights=None`, so torchvision state_dicts load unchanged and nothing
is downloaded; load published weights with `adakd.models.load_weights`.

torchvision's blocks end in an in-place ReLU on the residual sum, so no hook or FX node sees the pre-activation.
The staged view wraps the last block of each stage in `PreactBlock`, whose `forward` is the block's own and whose
`forward_preact` recomputes the block out of place (bitwise equal output, plus the sum before the ReLU).
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import Bottleneck, ResNet

from adakd.models.registry import register_model
from adakd.models.stage_types import Stage
from adakd.models.staged import Flatten, register_layout


class PreactBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck whose `forward_preact` also returns the residual sum before ReLU."""

    def __init__(self, block: tv_resnet.BasicBlock | Bottleneck):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (block output, residual sum before the final ReLU), computed without in-place ops."""
        block = self.block
        identity = x if block.downsample is None else block.downsample(x)
        out = block.bn1(block.conv1(x)).relu()
        if isinstance(block, Bottleneck):
            out = block.bn2(block.conv2(out)).relu()
            preact = block.bn3(block.conv3(out)) + identity
        else:
            preact = block.bn2(block.conv2(out)) + identity
        return preact.relu(), preact


@register_layout(ResNet)
def _stages(model: ResNet) -> list[Stage]:
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    return [
        Stage(
            "stem", [nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)], merge_into_next_block=True
        ),
        *(
            Stage(f"stage{i}", [*layer[:-1], PreactBlock(layer[-1])], has_preact=True,
                  preact_bn=getattr(layer[-1], "bn3", layer[-1].bn2))
            for i, layer in enumerate(layers, 1)
        ),
        Stage("pool", [nn.Sequential(model.avgpool, Flatten())]),
        Stage("head", [model.fc]),
    ]


@register_model
def resnet18(num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-18 (BasicBlocks 2-2-2-2), randomly initialised."""
    return tv_resnet.resnet18(weights=None, num_classes=num_classes)


@register_model
def resnet34(num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-34 (BasicBlocks 3-4-6-3), randomly initialised."""
    return tv_resnet.resnet34(weights=None, num_classes=num_classes)


@register_model
def resnet50(num_classes: int = 1000) -> ResNet:
    """torchvision ResNet-50 (Bottlenecks 3-4-6-3), randomly initialised."""
    return tv_resnet.resnet50(weights=None, num_classes=num_classes)
