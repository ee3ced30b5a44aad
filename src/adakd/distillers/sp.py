"""SP: Tung and Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, relational_term
from adakd.distillers.registry import register_distiller


def _similarity(feat: Tensor, weights: Tensor | None = None) -> Tensor:
    flat = feat.reshape(feat.shape[0], -1)
    gram = flat @ flat.t()
    if weights is not None:
        # Zeroed columns: each row is normalised over the selected samples only, as in the sub-batch's G.
        gram = gram * weights[None, :]
    return F.normalize(gram, dim=1)


def sp_loss(student_feat: Tensor, teacher_feat: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch-relational ||G_t - G_s||_F^2 / B^2 with G = row-wise L2-normalised F·Fᵀ of the flattened maps.

    Tung & Mori, ICCV 2019; follows HobbitLong/RepDistiller:distiller_zoo/SP.py (verified there by
    the paper's authors). Relations between samples are the point of the method, so there is no per-sample
    value: one scalar for the batch. Computed in float32 under AMP. No departure from the paper.
    """
    dtype = torch.promote_types(student_feat.dtype, torch.float32)
    # Dot products of maps with thousands of entries overflow float16: keep the matmuls out of autocast.
    with torch.autocast(student_feat.device.type, enabled=False):
        diff = _similarity(teacher_feat.to(dtype), weights) - _similarity(student_feat.to(dtype), weights)
        if weights is None:
            return diff.pow(2).sum() / student_feat.shape[0] ** 2
        pairs = weights[:, None] * weights[None, :]
        return (diff.pow(2) * pairs).sum() / weights.sum().clamp(min=1) ** 2


@dataclass(frozen=True)
class SPConfig:
    """SP has no internal hyper-parameters."""


@register_distiller("sp", tags=("classic",))
class SP(Distiller):
    """Similarity preservation at the last body stage f_{L-2}; a mask selects the sub-batch whose relations count."""

    name = "sp"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=3000.0, spots=(-3,))
    config_class = SPConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: SPConfig = SPConfig(), context=None) -> None:
        super().__init__(spot_names)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"sp/{spot}": relational_term(sp_loss, s, self.teacher_input(t), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
