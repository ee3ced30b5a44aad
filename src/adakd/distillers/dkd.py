"""DKD: Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation" (CVPR 2022)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import (DistillContext, Distiller, DistillerDefaults, masked_mean, per_class,
                                   require_equal_logits)
from adakd.distillers.kd import standardize_logits
from adakd.distillers.registry import register_distiller

# Subtracted from the target logit to take it out of the non-target softmax (mdistiller's constant).
_TARGET_OFFSET = 1000.0


def require_non_target_classes(method: str, term: str, logit_sizes: Sequence[tuple[int, ...]],
                               context: DistillContext | None = None) -> None:
    """Refuse fewer than 3 classes for a method whose `term` compares distributions over the non-target classes.

    With 2 classes the non-target distribution has one class, so the term is identically zero (with 1 it is
    undefined): the method would silently be something else. The class count is the dataset's
    (`DistillContext.num_classes`, when known) and every logit width.
    """
    counts = [int(size[0]) for size in logit_sizes]
    if context is not None and context.num_classes > 0:
        counts.append(int(context.num_classes))
    classes = min(counts)
    if classes < 3:
        why = ("with 2 classes that distribution has only one class, so the term is identically zero" if classes == 2
               else f"with {classes} class{'' if classes == 1 else 'es'} it is empty, so the term is undefined")
        raise ValueError(f"{method} needs at least 3 classes, got {classes}: its {term} term compares the "
                         f"distributions over the non-target classes, and {why}; use kd (or wsld, ttm) instead")


def _binary_log_probs(scaled_logits: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] per sample, without forming 1 - p (exact when p_target is near 1)."""
    log_total = torch.logsumexp(scaled_logits, dim=1)
    log_target = scaled_logits.gather(1, targets[:, None]).squeeze(1) - log_total
    log_rest = torch.logsumexp(scaled_logits - _TARGET_OFFSET * target_mask, dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """Per-sample (TCKD, NCKD), each T^2 * KL(teacher || student) summed over its classes.

    TCKD compares the binary [target, non-target] distributions of softmax(z / T); NCKD the distributions over
    the non-target classes only. KD = TCKD + (1 - p_target^teacher) * NCKD. `temperature` may be a tensor: a scalar
    or one per sample ([B]).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    student = student_logits.to(dtype) / per_class(temperature)
    teacher = teacher_logits.to(dtype) / per_class(temperature)
    # The one-hot rows by scatter, as one_hot builds them, without one_hot's host-side label range checks (a
    # .item() per call wherever they run; out-of-range labels still fail in scatter).
    target_mask = torch.zeros_like(student).scatter_(1, targets[:, None], 1.0)
    binary_student = _binary_log_probs(student, targets, target_mask)
    binary_teacher = _binary_log_probs(teacher, targets, target_mask)
    tckd = (binary_teacher.exp() * (binary_teacher - binary_student)).sum(1)
    rest_student = F.log_softmax(student - _TARGET_OFFSET * target_mask, dim=1)
    rest_teacher = F.log_softmax(teacher - _TARGET_OFFSET * target_mask, dim=1)
    nckd = (rest_teacher.exp() * (rest_teacher - rest_student)).sum(1)
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float,
             temperature: Tensor | float, warmup: float = 1.0, standardize: bool = False) -> Tensor:
    """Per-sample warmup * (alpha * TCKD + beta * NCKD); `warmup` = min(epoch / warm-up epochs, 1).

    `standardize`: both logit sets are z-scored first (`standardize_logits`, LS; as
    sunshangquan/logit-standardization-KD: mdistiller/distillers/DKD.py, `dkd_loss`) and T is LS's base temperature.

    Follows megvii-research/mdistiller:mdistiller/distillers/DKD.py (T^2 scaling, the -1000 offset on the target
    logit for NCKD, the linear warm-up of the whole term). Departure, numerical only: the binary distribution is
    taken in log space from log-sum-exps instead of the log of summed probabilities, which is log 0 = -inf
    when a float32 softmax saturates.
    """
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, temperature)
    return warmup * (alpha * tckd + beta * nckd)


@dataclass(frozen=True)
class DKDConfig:
    """DKD hyper-parameters (mdistiller's CIFAR-100 defaults; presets set beta per pair)."""

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20
    standardize: bool = False  # logit standardisation (LS, CVPR 2024): z-score both logit sets first


@register_distiller("dkd", tags=("classic",))
class DKD(Distiller):
    """Decoupled KD at the logits spot; weights CE 1, DKD 1 (alpha and beta are internal, recipes.md §3).

    `standardize: true` is DKD with logit standardisation (LS); LS's CIFAR-100 recipe is the preset ls-dkd (T 2,
    alpha 9, beta 72) and its per-pair values are `adakd.distillers.kd.LS_CIFAR100_PAIRS`.
    """

    name = "dkd"
    learned_temperature = True
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=(-1,))
    config_class = DKDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: DKDConfig = DKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_equal_logits("dkd", spot_names, student_shapes, teacher_shapes)
        require_non_target_classes("dkd", "NCKD", student_shapes, context)
        self.config = config

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        c = self.config
        warmup = min(epoch / c.warmup_epochs, 1.0) if c.warmup_epochs > 0 else 1.0
        temperature = self.temperature_at(c.temperature)
        return {
            f"dkd/{spot}": masked_mean(
                dkd_loss(s, self.teacher_input(t), targets, c.alpha, c.beta, temperature, warmup, c.standardize), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
