"""PKT: Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, relational_term
from adakd.distillers.registry import register_distiller


def _affinity(feat: Tensor, eps: float, weights: Tensor | None = None) -> Tensor:
    flat = feat.reshape(feat.shape[0], -1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    cosine = (unit @ unit.t() + 1.0) / 2.0
    if weights is None:
        return cosine / cosine.sum(dim=1, keepdim=True)
    # Rows normalised over the selected columns only, as in the sub-batch. A selected row's sum holds its own
    # c_ii >= 1/2; an unselected row (weighted out later) divides by 1 so that it stays finite whatever is selected.
    cosine = cosine * weights[None, :]
    rows = cosine.sum(dim=1, keepdim=True)
    return cosine / torch.where(weights[:, None] > 0, rows, torch.ones_like(rows))


def pkt_loss(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-7, weights: Tensor | None = None) -> Tensor:
    """Batch-relational mean_ij p^t_ij · log((p^t_ij + eps) / (p^s_ij + eps)).

    p_ij = c_ij / sum_k c_ik with c_ij = (cos(f_i, f_j) + 1) / 2 and rows L2-normalised as f / (||f|| + eps)
    (the cosine kernel of Passalis & Tefas, ECCV 2018). Follows
    HobbitLong/RepDistiller:distiller_zoo/PKT.py, which takes the mean over all B² entries rather than the paper's
    sum; the reference's NaN-to-zero step after normalising is dropped, since the +eps already keeps a zero row
    finite. One scalar for the batch; float32 under AMP.

    `weights` (0/1 per sample) gives the loss of the selected sub-batch on the whole batch: entries weighted by
    w_i w_j, the mean taken over the n² selected ones (n at least 1, so an empty selection stays finite).
    """
    dtype = torch.promote_types(student_feat.dtype, torch.float32)
    # eps = 1e-7 is below float16 resolution near 1: keep the cosine matmuls out of autocast.
    with torch.autocast(student_feat.device.type, enabled=False):
        p_student = _affinity(student_feat.to(dtype), eps, weights)
        p_teacher = _affinity(teacher_feat.to(dtype), eps, weights)
        divergence = p_teacher * torch.log((p_teacher + eps) / (p_student + eps))
        if weights is None:
            return divergence.mean()
        pairs = weights[:, None] * weights[None, :]
        return (divergence * pairs).sum() / weights.sum().clamp(min=1) ** 2


@dataclass(frozen=True)
class PKTConfig:
    """PKT hyper-parameters."""

    eps: float = 1e-7


@register_distiller("pkt", tags=("classic",))
class PKT(Distiller):
    """Probabilistic knowledge transfer on the pooled vector; a mask selects the sub-batch whose relations count."""

    name = "pkt"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=30000.0, spots=(-2,))
    config_class = PKTConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: PKTConfig = PKTConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        self.loss_fn = partial(pkt_loss, eps=config.eps)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"pkt/{spot}": relational_term(self.loss_fn, s, self.teacher_input(t), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
