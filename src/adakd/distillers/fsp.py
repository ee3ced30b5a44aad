"""FSP: Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning" (CVPR 2017), as the CRD benchmark (HobbitLong/RepDistiller, commit b84f547) runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import pool_to_common_size, require_maps
from adakd.distillers.registry import register_distiller


def flow_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """Per-sample FSP matrix [B, C_top, C_bottom]: G[c2, c1] = mean over positions of top[c2] * bottom[c1].

    The larger map is adaptive-average-pooled to the smaller one's size first (RepDistiller `FSP.compute_fsp`, which
    pools to a square of the smaller height; here each side to the smaller, the same on square maps).
    """
    dtype = torch.promote_types(bottom.dtype, torch.float32)
    bottom, top = pool_to_common_size(bottom.to(dtype), top.to(dtype))
    positions = bottom.shape[2] * bottom.shape[3]
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / positions


def fsp_loss(student_bottom: Tensor, student_top: Tensor, teacher_bottom: Tensor, teacher_top: Tensor) -> Tensor:
    """Per-sample mean over the matrix of (G_s - G_t)^2 for one pair of consecutive spots.

    Follows HobbitLong/RepDistiller:distiller_zoo/FSP.py `FSP.compute_loss` (b84f547), `(s - t).pow(2).mean()`
    over [B, C_top, C_bottom], which is the batch mean of these values.
    """
    difference = flow_matrix(student_bottom, student_top) - flow_matrix(teacher_bottom, teacher_top)
    return difference.pow(2).flatten(1).mean(1)


def pair_mask(bottom: Tensor | None, top: Tensor | None) -> Tensor | None:
    """A pair's samples: those selected at both of its spots (None: no mask at either)."""
    if bottom is None:
        return top
    return bottom if top is None else bottom * top


@dataclass(frozen=True)
class FSPConfig:
    """FSP's initialisation stage (RepDistiller `--init_epochs 30`, lr: the run's); the loss has no parameters."""

    pretrain_epochs: int = 30
    pretrain_lr: float | None = None

    def __post_init__(self) -> None:
        if self.pretrain_epochs < 0:
            raise ValueError(f"fsp pretrain_epochs must be >= 0, not {self.pretrain_epochs}")


@register_distiller("fsp", tags=("classic",))
class FSP(Distiller):
    """Flow matrices between consecutive spots (stem, f1..fN), matched in an initialisation stage.

    As RepDistiller's train_student.py (`--distill fsp`) and helper/pretrain.py `init`: before training, 30 epochs of
    SGD (the run's lr, momentum 0.9, wd 5e-4, constant) on the sum over consecutive pairs of `fsp_loss` (weight 1
    each) at feat[:-1] (stem and every body stage, after their ReLU), over the student's body; then plain training.
    Its distillation stage adds no FSP term (helper/loops.py: `loss_kd = 0` for fsp, so `-b 50` weighs a zero):
    method_weight 0, CE 1; a positive distill.method_weight keeps the terms, masked per sample (a pair's samples are
    those selected at both its spots). Terms are named by pair, `fsp/stem-stage1`.

    Student and teacher need equal channels at every spot and as many stages (RepDistiller raises 'num of channels
    not equal'; its cross-architecture table has no FSP row). Departures from the paper: the paper trains the
    student on the FSP loss of a residual network's stage pairs with its own schedule, then on the task; the CRD
    benchmark's pairs and schedule are used here.
    """

    name = "fsp"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=0.0, spots=(0, "stages"))
    config_class = FSPConfig
    pretrain_trains_student = True
    needs_equal_stage_counts: ClassVar[bool] = True

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: FSPConfig = FSPConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_maps("fsp", spot_names, student_shapes, teacher_shapes)
        if len(spot_names) < 2:
            raise ValueError(f"fsp relates consecutive spots, but got one ({spot_names[0]!r}); give at least two in "
                             "distill.spots")
        unequal = [f"{spot}: student {s[0]} vs teacher {t[0]}"
                   for spot, s, t in zip(spot_names, student_shapes, teacher_shapes) if s[0] != t[0]]
        if unequal:
            raise ValueError(f"fsp compares the student's and the teacher's flow matrices, so both need equal channels "
                             f"at every spot ({'; '.join(unequal)}); the CRD benchmark runs FSP only between networks "
                             "of one architecture and width (wrn_40_2 -> wrn_40_1 is 'N/A' in its table): choose such "
                             "a pair or another method")
        self.pretrain_epochs = config.pretrain_epochs
        self.pretrain_lr = config.pretrain_lr

    def term_names(self) -> list[str]:
        """One term per pair of consecutive spots."""
        return [f"fsp/{a}-{b}" for a, b in zip(self.spot_names, self.spot_names[1:])]

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        teacher_feats = [self.teacher_input(t) for t in teacher_feats]
        return {
            name: masked_mean(fsp_loss(student_feats[k], student_feats[k + 1], teacher_feats[k], teacher_feats[k + 1]),
                              pair_mask(masks[k], masks[k + 1]))
            for k, name in enumerate(self.term_names())
        }
