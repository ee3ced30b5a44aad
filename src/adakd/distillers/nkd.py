"""NKD: Yang, Zeng, Li, Zhang, Yuan and Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels" (ICCV 2023)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean, per_class, require_equal_logits
from adakd.distillers.dkd import require_non_target_classes
from adakd.distillers.registry import register_distiller


def non_target_index(targets: Tensor, num_classes: int) -> Tensor:
    """B x (C-1) column indices of every class but the target, in class order (static shape, no host sync)."""
    columns = torch.arange(num_classes - 1, device=targets.device)
    return columns + (columns[None, :] >= targets[:, None]).long()


def nkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: Tensor | float,
             gamma: float) -> Tensor:
    """Per-sample -p_t,y log p_s,y - gamma T^2 sum_{c != y} q_t,c log q_s,c.

    p = softmax(z) over all classes at T = 1 (the teacher's target probability a constant, as the reference's
    `.detach()`); q = softmax(z / T) over the C-1 non-target classes only (the target column removed, then the
    softmax renormalised). Both terms are cross-entropies as the reference computes them: the non-target one is
    larger than the KL by the teacher's non-target entropy (a constant) and has the same gradient.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    student = student_logits.to(dtype)
    teacher = teacher_logits.to(dtype)
    index = targets[:, None]
    target_log_p_student = F.log_softmax(student, dim=1).gather(1, index).squeeze(1)
    target_p_teacher = F.softmax(teacher.detach(), dim=1).gather(1, index).squeeze(1)
    target_term = -target_p_teacher * target_log_p_student
    rest = non_target_index(targets, student.shape[1])
    log_q_student = F.log_softmax(student.gather(1, rest) / per_class(temperature), dim=1)
    q_teacher = F.softmax(teacher.gather(1, rest) / per_class(temperature), dim=1)
    non_target_term = -(q_teacher * log_q_student).sum(dim=1)
    return target_term + gamma * temperature**2 * non_target_term


@dataclass(frozen=True)
class NKDConfig:
    """NKD hyper-parameters (cls_KD's CIFAR-100 preset; its class defaults are temperature 1, gamma 1.5)."""

    temperature: float = 3.0
    gamma: float = 3.5


@register_distiller("nkd", tags=("classic",))
class NKD(Distiller):
    """Normalized KD at the logits spot: the target class's teacher-weighted cross-entropy plus the non-target
    classes' renormalised distributions at T; weights CE 1, NKD 1, T = 3, gamma = 3.5 (CIFAR-100).

    Follows yzd-v/cls_KD: mmcls/models/dis_losses/nkd.py (branch 1.0), `NKDLoss.forward`, as fixed in 9466b3f
    (and mmcls/distillation/losses/nkd.py on master, fixed in ad4876f). CE 1 is the student head's own loss in the
    distiller (mmcls/models/classifiers/distiller.py), the NKD loss has weight 1.

    Defaults. CIFAR-100: configs/distillers/cifar100/res34_distill_res18_cifar.py, `temp=3.0, gamma=3.5` (a
    ResNet-34 -> ResNet-18 pair, not one of CRD's). ImageNet (configs/distillers/imagenet/*.py): `temp=1.0,
    gamma=1.5`, i.e. `method=nkd distill.args.temperature=1 distill.args.gamma=1.5`.

    Departures:
    - The non-target term excludes the target class, as the paper defines it and the fixed code computes it. The
      versions from e21ad37 (branch 1.0) and 1c2c0ff (master), both 2023-07-17, until the fixes of 2023-10-10
      scatter 1 into the mask (`scatter_(1, label, 1)`), so the mask keeps every class and the "non-target" term
      is plain KD over all classes (cls_KD issue #16, acknowledged by the author).
    - The non-target columns are gathered by index instead of boolean-mask indexing (same values; no host sync).
    - Fewer than 3 classes are refused: the non-target distribution then has one class and its term is zero.
    """

    name = "nkd"
    learned_temperature = True
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-1,))
    config_class = NKDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: NKDConfig = NKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_equal_logits("nkd", spot_names, student_shapes, teacher_shapes)
        require_non_target_classes("nkd", "non-target", student_shapes, context)
        self.config = config

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        c = self.config
        temperature = self.temperature_at(c.temperature)
        return {
            f"nkd/{spot}": masked_mean(nkd_loss(s, self.teacher_input(t), targets, temperature, c.gamma), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
