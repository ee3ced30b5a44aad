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
    """

    name: str
    blocks: list[nn.Module]
    merge_into_next_block: bool = False
    has_preact: bool = False


class StagedOutput(NamedTuple):
    """Outputs of the stages that ran: `features[k]` and `preacts[k]` for stage `start + k`."""

    features: list[Tensor]
    preacts: list[Tensor]


__all__ = ["Stage", "StagedOutput"]
