"""KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import register_distiller


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            detach_teacher: bool = True) -> Tensor:
    """Per-sample T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes.

    Follows HobbitLong/RepDistiller:distiller_zoo/KD.py (KL summed over classes, averaged over the batch by the
    caller, times T^2 so gradients keep their scale as T changes). Computed in float32 under AMP. The teacher's
    distribution is a constant unless `detach_teacher` is False (a teacher trained jointly with the student).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    teacher_logits = teacher_logits.detach() if detach_teacher else teacher_logits
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl * temperature**2


@dataclass(frozen=True)
class KDConfig:
    """KD hyper-parameters."""

    temperature: float = 4.0


@register_distiller("kd", tags=("classic",))
class KD(Distiller):
    """Vanilla logit distillation at the logits spot; the field's weights are CE 0.1 and KD 0.9."""

    name = "kd"
    defaults = DistillerDefaults(ce_weight=0.1, method_weight=0.9, spots=(-1,))
    config_class = KDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: KDConfig = KDConfig(), context=None) -> None:
        super().__init__(spot_names)
        for s, t in zip(student_shapes, teacher_shapes):
            if s != t:
                raise ValueError(f"kd needs logits of equal size; student {s} vs teacher {t}")
        self.temperature = config.temperature

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"kd/{spot}": masked_mean(kd_loss(s, t, self.temperature, detach_teacher=self.detach_teacher), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
