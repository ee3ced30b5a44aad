"""NST: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import pool_to_common_size, require_maps
from adakd.distillers.registry import register_distiller


def _mean_poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean over channel pairs (i, j) of k(a_i, b_j) = (a_i . b_j)^2."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean((1, 2))


def nst_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Per-sample squared MMD with the polynomial kernel k(x, y) = (x.y)^2 between channel distributions.

    Each channel of one sample, flattened over positions and L2-normalised, is one point:
    MMD^2 = mean K(t, t) + mean K(s, s) - 2 mean K(s, t), every Gram matrix inside one sample. Follows
    HobbitLong/RepDistiller:distiller_zoo/NST.py (full loss, larger map adaptive-average-pooled to the smaller);
    its mean over batch and channel pairs equals the batch mean of these values.
    """
    dtype = torch.promote_types(student_feat.dtype, torch.float32)
    student_feat, teacher_feat = pool_to_common_size(student_feat.to(dtype), teacher_feat.to(dtype))
    s = F.normalize(student_feat.flatten(2), dim=2)
    t = F.normalize(teacher_feat.flatten(2), dim=2)
    return _mean_poly_kernel(t, t) + _mean_poly_kernel(s, s) - 2 * _mean_poly_kernel(s, t)


@dataclass(frozen=True)
class NSTConfig:
    """NST has no internal hyper-parameters (polynomial kernel of degree 2, no offset, as in the CRD benchmark)."""


@register_distiller("nst", tags=("classic",))
class NST(Distiller):
    """Neuron selectivity transfer at every body stage, one term per stage; weights CE 1, NST 50 (recipes.md §3)."""

    name = "nst"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=50.0, spots=("stages",))
    config_class = NSTConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: NSTConfig = NSTConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_maps("nst", spot_names, student_shapes, teacher_shapes)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"nst/{spot}": masked_mean(nst_loss(s, self.teacher_input(t)), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
