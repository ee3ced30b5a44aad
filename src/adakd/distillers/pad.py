"""PAD-L2: Zhang, Lan, Dai, Zeng, Bai, Chang and Wei, "Prime-Aware Adaptive Distillation" (ECCV 2020)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import register_distiller


def pad_l2_loss(student_embed: Tensor, teacher_embed: Tensor, log_variance: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample PAD-L2 term mean_d [(t_d - s_d)^2 / (eps + exp(v_d)) + v_d], v the learned log-variances.

    Follows yoshitomo-matsubara/torchdistill@3e4373c torchdistill/losses/mid_level.py `PADL2Loss.forward` (one
    log-variance per embedding dimension and sample, the mean over dimensions "as the author's provided code");
    the batch mean of these values is its `reduction='mean'` loss. Computed in float32 under AMP (exp(v)).
    """
    dtype = torch.promote_types(student_embed.dtype, torch.float32)
    s, t, v = student_embed.flatten(1).to(dtype), teacher_embed.flatten(1).to(dtype), log_variance.to(dtype)
    return ((t - s).pow(2) / (eps + torch.exp(v)) + v).mean(1)


class VarianceBranch(nn.Module):
    """The variance estimator of PAD: Linear then BatchNorm1d on the student's embedding, read as log-variances
    (torchdistill's `VarianceBranch4PAD.var_estimator`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, student_embed: Tensor) -> Tensor:
        """Log-variances [B, out_features] of a [B, in_features] embedding."""
        return self.bn(self.linear(student_embed))


@dataclass(frozen=True)
class PADConfig:
    """PAD-L2 hyper-parameters (torchdistill's official ImageNet config: eps 1e-6)."""

    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"pad eps must be > 0 (it keeps 1 / (eps + exp(v)) finite), got {self.eps!r}")


@register_distiller("pad", tags=("classic",))
class PAD(Distiller):
    """L2 on the pooled embeddings weighted per sample and dimension by a learned variance; weights CE 1, PAD 1.

    PAD is itself adaptive: its variance branch (`VarianceBranch`, Linear + BatchNorm1d on the student's pooled
    embedding) predicts a log-variance v per sample and dimension, and the L2 of each is divided by exp(v) while
    + v penalises large variances, so hard ("non-prime") samples are down-weighted per sample as training goes. The
    branch is a trainable part of this distiller: it trains with the student, in the student's optimiser
    (`trainable_parameters`), and the student's embedding receives gradient through it too (nothing is detached,
    as in the reference). Under SAKD or ABL these learned weights compose with theirs: a SAKD mask zeroes a
    masked-out sample's term in the batch mean (`masked_mean`); the branch's BatchNorm still sees the whole batch.

    References. yoshitomo-matsubara/torchdistill@3e4373c: torchdistill/losses/mid_level.py `PADL2Loss`,
    torchdistill/models/wrapper.py `VarianceBranch4PAD` (Linear(feat_dim, feat_dim) + BatchNorm1d on
    `avgpool`'s flattened output), configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/pad_l2-resnet18_from_
    resnet34.yaml (student and teacher `avgpool` = the pooled spot; CE 1, PAD-L2 1, eps 1e-6, reduction mean).
    The paper's authors published no code; torchdistill's formula is the one here.

    Departures. The reference runs PAD-L2 as a second stage: 30 epochs (SGD lr 0.002) started from a student
    trained with CE + L2 (`cse_l2`/`ce_l2` configs); here PAD-L2 trains from the start in one run like every
    distiller. The reference needs student and teacher embeddings of equal width (ResNet-18/34: 512); when they
    differ here (adakd extension) the student's embedding passes through a trained Linear to the teacher's width
    and the variance branch outputs that width.
    """

    name = "pad"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-2,))
    config_class = PADConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: PADConfig = PADConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        for spot, s, t in zip(spot_names, student_shapes, teacher_shapes):
            if len(s) != 1 or len(t) != 1:
                raise ValueError(f"pad compares embedding vectors, but spot {spot!r} has student shape {tuple(s)} "
                                 f"and teacher shape {tuple(t)}; choose the pooled spot (distill.spots=[-2])")
        self.eps = config.eps
        self.connectors = nn.ModuleList(
            nn.Identity() if s == t else nn.Linear(s[0], t[0]) for s, t in zip(student_shapes, teacher_shapes))
        self.variance_branches = nn.ModuleList(
            VarianceBranch(s[0], t[0]) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        terms = {}
        for spot, connector, branch, s, t, m in zip(self.spot_names, self.connectors, self.variance_branches,
                                                    student_feats, teacher_feats, masks):
            per_sample = pad_l2_loss(connector(s), self.teacher_input(t), branch(s), self.eps)
            terms[f"pad/{spot}"] = masked_mean(per_sample, m)
        return terms
