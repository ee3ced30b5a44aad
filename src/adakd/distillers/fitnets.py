"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), single-stage as in the CRD benchmark."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import ConvReg
from adakd.distillers.registry import register_distiller


def fitnets_loss(regressed_student: Tensor, teacher_feat: Tensor) -> Tensor:
    """Per-sample hint loss: mean over C, H, W of (r(f_s) - f_t)^2, r the trained regressor.

    Follows HobbitLong/RepDistiller:distiller_zoo/FitNet.py (`nn.MSELoss` on ConvReg(f_2^S) and f_2^T, trained
    jointly with the student). The batch mean of these values equals that mean-reduced MSE. Departure from the
    paper: no separate hint-training stage (as RepDistiller and mdistiller).
    """
    dtype = torch.promote_types(regressed_student.dtype, torch.float32)
    return (regressed_student.to(dtype) - teacher_feat.to(dtype)).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class FitNetsConfig:
    """FitNets has no internal hyper-parameters; its regressor is built from the measured shapes."""


@register_distiller("fitnets", tags=("classic",))
class FitNets(Distiller):
    """Hint learning at f2 through a ConvReg regressor per spot; weights CE 1, hint 100 (recipes.md §3)."""

    name = "fitnets"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=100.0, spots=(2,))
    config_class = FitNetsConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: FitNetsConfig = FitNetsConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        self.regressors = nn.ModuleList(ConvReg(s, t) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"fitnets/{spot}": masked_mean(fitnets_loss(regressor(s), self.teacher_input(t)), m)
            for spot, regressor, s, t, m in zip(self.spot_names, self.regressors, student_feats, teacher_feats, masks)
        }
