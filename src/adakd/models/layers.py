"""Pieces shared by two or more model families."""
from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) conv weights, zero conv biases, BN scale 1 and shift 0; Linear layers are left alone."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
