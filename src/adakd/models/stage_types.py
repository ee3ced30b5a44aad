"""The staged view's shared types (a stage, the stages' outputs), imported by staged.py and auto_staged.py alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn


@dataclass
class Stage:
    """One stage: blocks run in order.

    `merge_into_next_block` marks a stem that is not a block of its own for ABL (ResNet's stem joins
    block 1, VGG's first conv is a block). The pool and head stages always join the last block.
    `preact_bn` is the BatchNorm before the stage's last ReLU, as mdistiller's `get_bn_before_relu` names it.
    """

    name: str
    blocks: list[nn.Module]
    merge_into_next_block: bool = False
    has_preact: bool = False
    # The BatchNorm whose affine output feeds the ReLU after this stage (OFD's margins read its weight and bias);
    # None where the layout names none (timm, torchvision, ShuffleNets, as in mdistiller).
    preact_bn: nn.Module | None = None


class StagedOutput(NamedTuple):
    """Outputs of the stages that ran: `features[k]` and `preacts[k]` for stage `start + k`."""

    features: list[Tensor]
    preacts: list[Tensor]


__all__ = ["Stage", "StagedOutput"]
