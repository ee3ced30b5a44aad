"""SAKD's adaptation layers H_st / H_ts between a student and a teacher feature (specs/sakd.md §4)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.connectors import ConvReg

ADAPTER_FAMILIES = ("conv1x1", "convreg")


class Conv1x1Adapter(nn.Module):
    """A 1x1 convolution with bias, no BN, no ReLU ([P] §III-A); parameter-free resampling when sizes differ.

    A 1x1 conv cannot change resolution, so a larger source is adaptive-average-pooled before the conv and a
    smaller one is nearest-upsampled after it (an adakd choice, §4; the paper is silent).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], out_shape[0], kernel_size=1)
        self.out_size = (int(out_shape[1]), int(out_shape[2]))
        self.pooled_size = (min(in_shape[1], out_shape[1]), min(in_shape[2], out_shape[2]))
        self.pool_first = self.pooled_size != tuple(in_shape[1:])
        self.upsample_after = self.pooled_size != self.out_size

    def forward(self, x: Tensor) -> Tensor:
        """Map a [B, C_in, H_in, W_in] feature to [B, C_out, H_out, W_out]."""
        if self.pool_first:
            x = F.adaptive_avg_pool2d(x, self.pooled_size)
        x = self.conv(x)
        if self.upsample_after:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
        return x


def build_adapter(family: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Module:
    """One adapter from a feature shape (without batch) to another.

    Vector spots get a bare `nn.Linear` in every family (§4), token maps a per-token `nn.Linear`; maps get `Conv1x1Adapter` (`conv1x1`, preset `sakd`)
    or FitNets' conv-BN-ReLU `ConvReg` with its strided / transposed convs (`convreg`, preset `sakd-faithful`,
    [C] models/util.py).
    """
    if family not in ADAPTER_FAMILIES:
        raise ValueError(f"adapter must be one of {ADAPTER_FAMILIES}, not {family!r}")
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if len(in_shape) == 1 and len(out_shape) == 1:
        return nn.Linear(in_shape[0], out_shape[0])
    if len(in_shape) == 2 and len(out_shape) == 2:
        # Token maps [B, N, C] of two transformers: the 1x1 conv's analogue is a per-token Linear (adakd's choice,
        # the paper routes CNNs only); a different token count has no parameter-free resampling that keeps the cls.
        if in_shape[0] != out_shape[0]:
            raise ValueError(f"SAKD routes between token maps of equal length, not {in_shape} -> {out_shape}; give "
                             "both transformers the same patch grid (img_size / patch_size)")
        return nn.Linear(in_shape[1], out_shape[1])
    if len(in_shape) != 3 or len(out_shape) != 3:
        raise ValueError(f"SAKD routes between two maps, two token maps or two vectors, not {in_shape} -> "
                         f"{out_shape}")
    if family == "conv1x1":
        return Conv1x1Adapter(in_shape, out_shape)
    return ConvReg(in_shape, out_shape)
