"""Parameter-free and trainable bridges between a student feature and a teacher feature of another shape."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def pool_to_common_size(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two [B, C, H, W] maps to the other's spatial size.

    The rule of HobbitLong/RepDistiller's AT, NST and FT losses (which compare heights only and pool to a square);
    here each spatial dimension is pooled to the smaller of the two.
    """
    size = (min(student_feat.shape[2], teacher_feat.shape[2]), min(student_feat.shape[3], teacher_feat.shape[3]))
    if tuple(student_feat.shape[2:]) != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    if tuple(teacher_feat.shape[2:]) != size:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return student_feat, teacher_feat


def require_maps(method: str, spot_names: Sequence[str], *shape_lists: Sequence[tuple[int, ...]]) -> None:
    """Raise ValueError unless every shape is a (C, H, W) map: `method` compares spatial maps."""
    for shapes in shape_lists:
        for spot, shape in zip(spot_names, shapes):
            if len(shape) != 3:
                raise ValueError(f"{method} compares spatial maps, but spot {spot!r} has shape {tuple(shape)}; "
                                 f"choose body-stage spots (distill.spots)")


def _resampling_conv(in_channels: int, out_channels: int, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> nn.Module:
    (h_in, w_in), (h_out, w_out) = in_hw, out_hw
    if h_in == 2 * h_out and w_in == 2 * w_out:
        return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
    if 2 * h_in == h_out and 2 * w_in == w_out:
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
    if h_in >= h_out and w_in >= w_out:
        return nn.Conv2d(in_channels, out_channels, kernel_size=(1 + h_in - h_out, 1 + w_in - w_out))
    if h_in <= h_out and w_in <= w_out:
        # adakd extension: the transposed mirror of the valid-conv case (RepDistiller raises here).
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=(1 + h_out - h_in, 1 + w_out - w_in))
    raise ValueError(f"cannot regress a {h_in}x{w_in} map onto a {h_out}x{w_out} map (one side grows, one shrinks)")


class ConvReg(nn.Module):
    """FitNets' convolutional regressor from one feature shape to another, then BN and (optionally) ReLU.

    Follows HobbitLong/RepDistiller:models/util.py `ConvReg`: 3x3 conv stride 2 when the input is twice as high,
    4x4 transposed conv stride 2 when half as high, otherwise a valid conv of kernel 1 + H_in - H_out. Pooled
    vectors, (C,) -> (C',), get RepDistiller's `Regress` (Linear, then ReLU); a map and a vector cannot be bridged.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], relu: bool = True) -> None:
        super().__init__()
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(in_shape) == 1 and len(out_shape) == 1:
            self.conv = nn.Linear(in_shape[0], out_shape[0])
            self.bn = nn.Identity()  # RepDistiller's vector regressor has no normalisation
        elif len(in_shape) == 3 and len(out_shape) == 3:
            self.conv = _resampling_conv(in_shape[0], out_shape[0], in_shape[1:], out_shape[1:])
            self.bn = nn.BatchNorm2d(out_shape[0])
        else:
            raise ValueError(f"ConvReg bridges two maps (C, H, W) or two vectors (C,), not {in_shape} -> {out_shape}")
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map a [B, *in_shape] feature to [B, *out_shape]."""
        return self.relu(self.bn(self.conv(x)))
