"""SRD: Miles and Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation" (AAAI 2024),
the "simple recipe" distillation torchdistill ships as `SRDLoss`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean, relational_term, require_equal_logits
from adakd.distillers.registry import register_distiller


def batch_standardise(x: Tensor, eps: float, weights: Tensor | None = None) -> Tensor:
    """(x - batch mean) / sqrt(biased batch variance + eps) per dimension: BatchNorm1d(affine=False) in training mode.

    `weights` (0/1 per sample) takes the mean and variance over the selected samples only, keeping the shapes static.
    """
    if weights is None:
        mean = x.sum(0) / x.shape[0]
        var = (x - mean).pow(2).sum(0) / x.shape[0]
    else:
        w = weights.to(x.dtype)[:, None]
        count = w.sum().clamp(min=1)  # an empty selection keeps a finite (unused) value
        mean = (x * w).sum(0) / count
        var = ((x - mean).pow(2) * w).sum(0) / count
    return (x - mean) / torch.sqrt(var + eps)


def srd_feature_loss(projected_student: Tensor, teacher_embed: Tensor, exponent: float = 4.0, eps: float = 1e-4,
                     weights: Tensor | None = None) -> Tensor:
    """Batch-level log(sum over samples and dimensions of |BN(P f_s) - BN(f_t)|^exponent), BN the batch statistics.

    P f_s is the trained projection of the student's pooled feature. Follows roymiles/Simple-Recipe-Distillation
    @31e8477 imagenet/torchdistill/losses/single.py `OurDistillationLoss.forward_loss` (bn_s, bn_t:
    BatchNorm1d(eps 1e-4, affine=False) in training mode; `torch.log(c_diff.sum())`). The log of a batch sum does
    not split per sample: `weights` (0/1) gives the selected sub-batch's value (its statistics, its sum), for
    `relational_term`. Fewer than 2 selected samples would give log 0: that (unused) value is replaced by log 1 so
    its gradient stays zero, never NaN.
    """
    dtype = torch.promote_types(projected_student.dtype, torch.float32)
    with torch.autocast(projected_student.device.type, enabled=False):
        s = batch_standardise(projected_student.to(dtype), eps, weights)
        t = batch_standardise(teacher_embed.to(dtype), eps, weights)
        per_entry = (s - t).abs().pow(exponent)
        if weights is None:
            return torch.log(per_entry.sum())
        w = weights.to(dtype)
        total = (per_entry * w[:, None]).sum()
        return torch.log(torch.where(w.sum() >= 2, total, torch.ones_like(total)))


def srd_logit_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample T^2 KL(softmax(z_t / T) || softmax(z_s / T)); its batch mean is the reference's logit term."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * temperature**2


@dataclass(frozen=True)
class SRDConfig:
    """SRD hyper-parameters (the authors' ImageNet code and torchdistill's official config)."""

    exponent: float = 4.0  # p of |BN(P f_s) - BN(f_t)|^p
    feature_weight: float = 2.0  # the factor on the log feature term
    temperature: float = 1.0
    bn_eps: float = 1e-4

    def __post_init__(self) -> None:
        if not self.exponent > 0:
            raise ValueError(f"srd exponent must be > 0, got {self.exponent!r}")
        if not self.temperature > 0:
            raise ValueError(f"srd temperature must be > 0 (it divides the logits), got {self.temperature!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"srd bn_eps must be > 0, got {self.bn_eps!r}")


@register_distiller("srd", tags=("classic",))
class SRD(Distiller):
    """2 log sum |BN(P f_s) - BN(f_t)|^4 on the pooled features + KL(p_t || p_s) at T = 1; weights CE 1, SRD 1.

    Two spots, two terms: `srd/<feature spot>` (default the pooled vector; a map is averaged over H x W first, as
    the reference's `layer4` output `.mean(-1).mean(-1)`) and `srd/logits`. P is a trained Linear from the student's
    width to the teacher's (always present, as in the reference, also at equal widths); BN is a batch
    standardisation without affine parameters on both sides.

    References. The authors' code, roymiles/Simple-Recipe-Distillation@31e8477: imagenet/torchdistill/losses/
    single.py `OurDistillationLoss` (embed Linear(512, 512), bn_s/bn_t BatchNorm1d(eps 1e-4, affine=False),
    `l_rep = 2 * log(sum |.|^4)`, `l_logit` KL at T = 1 summed over the batch times T^2 / B) with
    imagenet/configs/ilsvrc2012/ours/res3418.yaml (CE 1, the loss 1). torchdistill,
    yoshitomo-matsubara/torchdistill@3e4373c: torchdistill/losses/mid_level.py `SRDLoss` (2 * log(sum |.|^exponent)
    + KLDivLoss(batchmean) at T) with models/wrapper.py `SRDModelWrapper` and configs/official/ilsvrc2012/roymiles/
    aaai2024/srd-resnet18_from_resnet34.yaml (exponent 4, T 1, CE 1, SRD 1).

    Departures. The normalisation always uses the batch's statistics, as the authors' loss module (kept in training
    mode) does; torchdistill's port places the teacher's BatchNorm1d inside the teacher wrapper, where it follows
    the teacher's mode. The reference has no masks: the logit term is per sample (`masked_mean`); the feature term
    is the log of a batch sum, so under a SAKD mask it is the selected sub-batch's (its statistics and its sum)
    times the selection's share, as every relational term (`relational_term`), and exactly 0 with fewer than 2
    selected samples. The method is not Yang et al.'s SRRL (ICLR 2021, the student's feature through the teacher's
    classifier); torchdistill's `SRDLoss` is this one.
    """

    name = "srd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-2, -1))
    config_class = SRDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: SRDConfig = SRDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        if len(spot_names) != 2:
            raise ValueError(f"srd reads two spots, a feature and the logits, got {list(spot_names)}; "
                             "give distill.spots=[-2,-1] (pooled, logits) or [FEATURE_STAGE,-1]")
        feature_spot, (student_feature, teacher_feature) = spot_names[0], (student_shapes[0], teacher_shapes[0])
        if len(student_feature) not in (1, 3) or len(teacher_feature) not in (1, 3):
            raise ValueError(f"srd's first spot must be a feature map or vector, but {feature_spot!r} has student "
                             f"shape {tuple(student_feature)} and teacher shape {tuple(teacher_feature)}")
        require_equal_logits("srd", spot_names[1:], student_shapes[1:], teacher_shapes[1:])
        self.config = config
        self.projector = nn.Linear(student_feature[0], teacher_feature[0])

    @staticmethod
    def _pooled(feat: Tensor) -> Tensor:
        return feat.mean((2, 3)) if feat.dim() == 4 else feat

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        c = self.config
        feature_spot, logit_spot = self.spot_names
        projected = self.projector(self._pooled(student_feats[0]))
        teacher_embed = self._pooled(self.teacher_input(teacher_feats[0]))
        feature_loss = partial(srd_feature_loss, exponent=c.exponent, eps=c.bn_eps)
        logits = srd_logit_loss(student_feats[1], self.teacher_input(teacher_feats[1]), c.temperature)
        return {
            f"srd/{feature_spot}": c.feature_weight * relational_term(feature_loss, projected, teacher_embed, masks[0]),
            f"srd/{logit_spot}": masked_mean(logits, masks[1]),
        }
