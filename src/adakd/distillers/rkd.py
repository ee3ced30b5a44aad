"""RKD: Park, Kim, Lu and Cho, "Relational Knowledge Distillation" (CVPR 2019)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, relational_term
from adakd.distillers.registry import register_distiller


def _distances(x: Tensor, eps: float, pairs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pairwise Euclidean distances over their mean positive entry, and whether that mean is positive.

    `pairs` (w_i w_j) zeroes the pairs outside the selection, so the mean is the selected sub-batch's.
    """
    squared = x.pow(2).sum(dim=1)
    dist = (squared[:, None] + squared[None, :] - 2.0 * x @ x.t()).clamp(min=eps).sqrt()
    off_diagonal = 1.0 - torch.eye(x.shape[0], dtype=dist.dtype, device=dist.device)
    dist = dist * (off_diagonal if pairs is None else off_diagonal * pairs)
    mean = dist.sum() / (dist > 0).sum().clamp(min=1)
    positive = mean > 0
    # Dividing by 1 where the mean is 0 keeps value and gradient finite; the caller then drops the term.
    return dist / torch.where(positive, mean, torch.ones_like(mean)), positive


def _angles(x: Tensor) -> Tensor:
    """cos of the angle at vertex i between x_j and x_k, for every triplet (i, j, k)."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2)
    return unit @ unit.transpose(1, 2)


def rkd_loss(student_feat: Tensor, teacher_feat: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             eps: float = 1e-12, weights: Tensor | None = None) -> Tensor:
    """Batch-relational w_d·smoothL1(ψ_D^s, ψ_D^t) + w_a·smoothL1(ψ_A^s, ψ_A^t), each averaged over its entries.

    ψ_D = pairwise Euclidean distances (squared distances clamped at eps before the root, diagonal 0) divided by
    their mean over positive entries; ψ_A = cosines of the angles over all B³ triplets (Park et al., CVPR 2019).
    Follows HobbitLong/RepDistiller:distiller_zoo/RKD.py. Departure: where a mean distance is 0 (a
    batch of one) the distance term is 0 instead of NaN; the mean is taken without boolean indexing, so no host
    sync. One scalar for the batch; float32 under AMP.

    `weights` (0/1 per sample) gives the loss of the selected sub-batch on the whole batch: distance entries
    weighted by w_i w_j over n², angle entries by w_i w_j w_k over n³ (n at least 1: an empty selection is finite).
    """
    dtype = torch.promote_types(student_feat.dtype, torch.float32)
    student = student_feat.reshape(student_feat.shape[0], -1).to(dtype)
    teacher = teacher_feat.reshape(teacher_feat.shape[0], -1).to(dtype)
    # |a|² + |b|² - 2ab cancels catastrophically in float16: keep the matmuls out of autocast.
    with torch.autocast(student.device.type, enabled=False):
        if weights is None:
            dist_s, ok_s = _distances(student, eps)
            dist_t, ok_t = _distances(teacher, eps)
            distance_term = F.smooth_l1_loss(dist_s, dist_t) * (ok_s & ok_t)
            angle_term = F.smooth_l1_loss(_angles(student), _angles(teacher))
        else:
            w = weights.to(dtype)
            n = w.sum().clamp(min=1)
            pairs = w[:, None] * w[None, :]
            dist_s, ok_s = _distances(student, eps, pairs)
            dist_t, ok_t = _distances(teacher, eps, pairs)
            distance = F.smooth_l1_loss(dist_s, dist_t, reduction="none") * pairs
            distance_term = distance.sum() / n**2 * (ok_s & ok_t)
            angle = F.smooth_l1_loss(_angles(student), _angles(teacher), reduction="none") * (pairs[:, :, None] * w)
            angle_term = angle.sum() / n**3
        return distance_weight * distance_term + angle_weight * angle_term


@dataclass(frozen=True)
class RKDConfig:
    """RKD hyper-parameters: term weights w_d, w_a and the pairwise-distance clamp."""

    distance_weight: float = 25.0
    angle_weight: float = 50.0
    eps: float = 1e-12


@register_distiller("rkd", tags=("classic",))
class RKD(Distiller):
    """Distance- and angle-wise relations on the pooled vector; a mask selects the sub-batch whose relations count."""

    name = "rkd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-2,))
    config_class = RKDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: RKDConfig = RKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        self.loss_fn = partial(rkd_loss, distance_weight=config.distance_weight, angle_weight=config.angle_weight,
                               eps=config.eps)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"rkd/{spot}": relational_term(self.loss_fn, s, self.teacher_input(t), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
