"""ICKD: Liu, Huang, Lin, Xie, Wang, Chang and Liang, "Exploring Inter-Channel Correlation for Diversity-preserved
Knowledge Distillation" (ICCV 2021), its ICKD-C loss (inter-channel correlation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import require_maps
from adakd.distillers.registry import register_distiller

EMBED_KERNELS = (1, 3)


def channel_correlation(feat: Tensor) -> Tensor:
    """Per-sample C x C inter-channel Gram matrix F Fᵀ of a [B, C, H, W] map, each row L2-normalised."""
    flat = feat.flatten(2)
    return F.normalize(flat @ flat.transpose(1, 2), dim=2)


def ickd_loss(embedded_student: Tensor, teacher_feat: Tensor) -> Tensor:
    """Per-sample ICKD-C term ||G(e(f_s)) - G(f_t)||_F^2 / C, G the row-normalised channel Gram matrix.

    e is the trained embedding (a conv to the teacher's C channels, then BN). The spatial sizes may differ: a Gram
    matrix is C x C whatever H x W. The batch mean of these values is the authors' CIFAR-100 loss
    (ADLab-AutoDrive/ICKD@403b8d3 Cifar100/distiller_zoo/ICKD.py `ICKDLoss.batch_loss`: the batch sum over
    ch * bsz). Computed in float32 under AMP (the Gram matrices sum H*W products).
    """
    dtype = torch.promote_types(embedded_student.dtype, torch.float32)
    with torch.autocast(embedded_student.device.type, enabled=False):
        diff = channel_correlation(embedded_student.to(dtype)) - channel_correlation(teacher_feat.to(dtype))
        return diff.pow(2).flatten(1).sum(1) / diff.shape[1]


class ChannelEmbed(nn.Module):
    """The student-side embedding of ICKD: a bias-free conv (kernel 1 or 3, stride 1, same size) to the teacher's
    channels, then BatchNorm (the authors' `Embed`; torchdistill's `ChannelSimilarityEmbed` uses kernel 3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Map [B, C_s, H, W] to [B, C_t, H, W]."""
        return self.bn(self.conv(x))


@dataclass(frozen=True)
class ICKDConfig:
    """ICKD hyper-parameters: the embedding's kernel (1: the authors' CIFAR-100 code; 3: torchdistill's ImageNet)."""

    embed_kernel: int = 1

    def __post_init__(self) -> None:
        if self.embed_kernel not in EMBED_KERNELS:
            raise ValueError(f"ickd embed_kernel must be one of {EMBED_KERNELS} (1: the authors' CIFAR-100 embedding, "
                             f"3: torchdistill's ImageNet one), not {self.embed_kernel!r}")


@register_distiller("ickd", tags=("classic",))
class ICKD(Distiller):
    """Inter-channel correlation (ICKD-C) at the last body stage f_{L-2}; weights CE 1, ICKD 2.5 (CIFAR-100).

    References. The authors' CIFAR-100 code, ADLab-AutoDrive/ICKD@403b8d3: Cifar100/distiller_zoo/ICKD.py
    (`Embed`: 1x1 conv, no bias, then BatchNorm2d to the teacher's channels; `ICKDLoss.batch_loss`: F Fᵀ per
    sample, rows L2-normalised, squared difference summed and divided by ch * bsz), Cifar100/helper/loops.py (the
    spot feat[-2], the last body stage, post-activation), Cifar100/README.md and scripts/run_cifar_distill.sh (`-r 1
    -a 0 -b 2.5` for ICKD-C, `-a 1` adds RepDistiller's KD at T = 4: `distill.kl_weight=1` here). torchdistill,
    yoshitomo-matsubara/torchdistill@3e4373c: torchdistill/losses/mid_level.py `ChSimLoss.batch_loss` (the same
    formula) and models/wrapper.py `ChannelSimilarityEmbed` (3x3 conv + BN, `embed_kernel=3` here), configured by
    configs/sample/ilsvrc2012/ickd/resnet18_from_resnet34.yaml (layer4; KDLoss T 1, alpha 0.5 + ChSimLoss weight
    500; AdamW).

    Departures. torchdistill's ChSimLoss divides the batch sum by ch * bsz^2, i.e. this batch mean over bsz once
    more; its ImageNet weight 500 at batch 256 is about 1.95 in this (the authors') normalisation. The authors' code
    also builds and trains a teacher-side `embed_t` that no loss uses; it is left out (it changes nothing but the
    optimiser's parameter list). Per-sample: a SAKD mask zeroes a masked-out sample's term in the batch mean
    (`masked_mean`); the embedding's BatchNorm still sees the whole batch, as FitNets' regressor does.
    """

    name = "ickd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=2.5, spots=(-3,))
    config_class = ICKDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: ICKDConfig = ICKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_maps("ickd", spot_names, student_shapes, teacher_shapes)
        self.embeddings = nn.ModuleList(
            ChannelEmbed(s[0], t[0], config.embed_kernel) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"ickd/{spot}": masked_mean(ickd_loss(embed(s), self.teacher_input(t)), m)
            for spot, embed, s, t, m in zip(self.spot_names, self.embeddings, student_feats, teacher_feats, masks)
        }
