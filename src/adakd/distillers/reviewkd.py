"""ReviewKD: Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review" (CVPR 2021)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import register_distiller

HCL_POOL_SIZES = (4, 2, 1)


def hcl_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Per-sample hierarchical context loss of one level: sum_l w_l MSE(pool_l(s), pool_l(t)) / sum_l w_l.

    Level l = full resolution (w 1), then adaptive average pools to 4, 2, 1 with w 1/2, 1/4, 1/8, skipping pool
    sizes >= the map's height; each MSE is a mean over channels and positions. The batch mean is
    megvii-research/mdistiller:mdistiller/distillers/ReviewKD.py (hcl_loss) for one level.
    """
    dtype = torch.promote_types(student_map.dtype, torch.float32)  # float32 under AMP, float64 kept
    student_map, teacher_map = student_map.to(dtype), teacher_map.to(dtype)
    total = (student_map - teacher_map).pow(2).flatten(1).mean(dim=1)
    weight, weight_sum = 1.0, 1.0
    for size in HCL_POOL_SIZES:
        if size >= student_map.shape[2]:
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student_map, size)
        pooled_t = F.adaptive_avg_pool2d(teacher_map, size)
        total = total + (pooled_s - pooled_t).pow(2).flatten(1).mean(dim=1) * weight
        weight_sum += weight
    return total / weight_sum


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """The ramp min(epoch / warmup_epochs, 1) of mdistiller, epochs counted from 1."""
    return min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


class AttentionFusion(nn.Module):
    """ABF: 1x1 conv + BN, attention-weighted sum with the deeper level's residual, 3x3 conv + BN."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Return (this level's output, the residual handed to the next shallower level)."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.output(x), x


def as_map(feature: Tensor) -> Tensor:
    """A pooled vector [B, C] as a 1x1 map [B, C, 1, 1]; maps pass through."""
    return feature if feature.dim() == 4 else feature[:, :, None, None]


def map_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The (C, H, W) a feature of this shape has once `as_map` made it a map."""
    if len(shape) not in (1, 3):
        raise ValueError(f"reviewkd needs maps (C, H, W) or vectors (C,); got a feature of shape {tuple(shape)}")
    return tuple(shape) if len(shape) == 3 else (shape[0], 1, 1)


@dataclass(frozen=True)
class ReviewKDConfig:
    """ReviewKD hyper-parameters (mdistiller's CIFAR-100 values; ImageNet sets student_preact)."""

    warmup_epochs: int = 20
    mid_channels_max: int = 512
    student_preact: bool = False


@register_distiller("reviewkd", tags=("classic",))
class ReviewKD(Distiller):
    """Student levels fused deepest first by ABF blocks, each matched to the teacher level by HCL.

    Spots are read shallow to deep (the last is the deepest, normally the pooled vector). One term per level,
    named by the student spot, already multiplied by the warm-up ramp. Follows mdistiller (teacher pre-activations,
    student post-activations as its CIFAR default STU_PREACT = False). Departures: one term per level instead of
    their sum; shapes and channels measured, not configured; `mid_channels_max` is honoured (mdistiller hard-codes
    512). In training mode the ABF BatchNorms use batch statistics, so a masked level still couples samples
    through them, as in mdistiller.
    """

    name = "reviewkd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=5.0, spots=("stages", -2))
    config_class = ReviewKDConfig
    student_preact = False
    teacher_preact = True

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: ReviewKDConfig = ReviewKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        if len(student_shapes) != len(teacher_shapes):
            raise ValueError(f"reviewkd pairs levels one to one; student has {len(student_shapes)} spots, "
                             f"teacher {len(teacher_shapes)}")
        student_maps = [map_shape(s) for s in student_shapes]
        teacher_maps = [map_shape(t) for t in teacher_shapes]
        mid = min(config.mid_channels_max, student_maps[-1][0])
        last = len(student_maps) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(s[0], mid, t[0], fuse=level < last)
            for level, (s, t) in enumerate(zip(student_maps, teacher_maps))
        )
        self.out_sizes = [tuple(t[1:]) for t in teacher_maps]
        self.warmup_epochs = config.warmup_epochs
        self.student_preact = config.student_preact

    def fuse(self, student_feats: list[Tensor]) -> list[Tensor]:
        """The student's levels reviewed deepest first; level k comes out in the teacher's level-k shape."""
        fused: list[Tensor] = [None] * len(student_feats)
        residual = None
        for level in reversed(range(len(student_feats))):
            fused[level], residual = self.fusions[level](as_map(student_feats[level]), residual, self.out_sizes[level])
        return fused

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        ramp = warmup_factor(epoch, self.warmup_epochs)
        return {
            f"reviewkd/{spot}": masked_mean(hcl_loss(s, as_map(self.teacher_input(t))), m) * ramp
            for spot, s, t, m in zip(self.spot_names, self.fuse(student_feats), teacher_feats, masks)
        }
