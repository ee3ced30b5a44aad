"""TTM and WTTM: Zheng and Yang, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean, require_equal_logits
from adakd.distillers.registry import register_distiller


def ttm_parts(student_logits: Tensor, teacher_logits: Tensor, power: float) -> tuple[Tensor, Tensor]:
    """Per-sample (KL(p_t^l / U || softmax(z_s)), U) with p_t = softmax(z_t) and U = sum_c p_t,c^l.

    The power-transformed teacher p_t^l / U is softmax(l z_t), i.e. the teacher at temperature 1/l, while the
    student keeps temperature 1; there is no T^2 factor. Taken in log space (l * log p_t and a log-sum-exp) rather
    than as torch.pow of probabilities: the same value, without 0^l for a teacher probability that underflows.
    The teacher enters as given (detach it first, as `Distiller.teacher_input` does).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    log_p_student = F.log_softmax(student_logits.to(dtype), dim=1)
    powered = power * F.log_softmax(teacher_logits.to(dtype), dim=1)
    log_norm = torch.logsumexp(powered, dim=1)  # log U
    log_q = powered - log_norm[:, None]
    kl = (log_q.exp() * (log_q - log_p_student)).sum(dim=1)
    return kl, log_norm.exp()


def ttm_loss(student_logits: Tensor, teacher_logits: Tensor, power: float) -> Tensor:
    """Per-sample TTM term: KL(power-transformed teacher || student), both over all classes."""
    return ttm_parts(student_logits, teacher_logits, power)[0]


def wttm_loss(student_logits: Tensor, teacher_logits: Tensor, power: float) -> Tensor:
    """Per-sample WTTM term: U_i * KL_i, the TTM term weighted by U_i = sum_c p_t,c^l, a constant (no gradient)."""
    kl, norm = ttm_parts(student_logits, teacher_logits, power)
    return norm.detach() * kl


@dataclass(frozen=True)
class TTMConfig:
    """TTM / WTTM hyper-parameter: the power l applied to the teacher's probabilities (teacher temperature 1/l)."""

    power: float = 0.1


@register_distiller("ttm", tags=("classic",))
class TTM(Distiller):
    """Transformed teacher matching at the logits spot: the student at T = 1 matches the teacher at T = 1/l;
    weights CE 1, TTM 45 at l = 0.1 (the authors' README example, vgg13 -> vgg8 on CIFAR-100).

    Follows zkxufo/TTM: distiller_zoo/ttm.py, `TTM.forward` (batch mean of the per-sample KL), with the total
    r*CE + b*TTM of helper/loops.py (`-r 1 -b 45 --ttm_l 0.1`). The per-pair l and weights are in the paper's
    appendix A.4, not in the repository; its README gives only this example. ImageNet was run with torchdistill,
    whose TTM configuration is not in the repository: no ImageNet default is claimed here.

    Departure, numerical only: the transformed teacher is computed in log space (see `ttm_parts`).
    """

    name = "ttm"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=45.0, spots=(-1,))
    config_class = TTMConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: TTMConfig = TTMConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_equal_logits(self.name, spot_names, student_shapes, teacher_shapes)
        if not config.power > 0:  # also NaN
            raise ValueError(f"{self.name} needs distill.args.power > 0 (the teacher's temperature is 1/power; the "
                             f"authors use 0.1-0.2), got {config.power}")
        self.power = config.power

    def per_sample(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The per-sample term of this method."""
        return ttm_loss(student, teacher, self.power)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"{self.name}/{spot}": masked_mean(self.per_sample(s, self.teacher_input(t)), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }


@dataclass(frozen=True)
class WTTMConfig:
    """WTTM hyper-parameter: the power l (the README's WTTM example uses 0.2)."""

    power: float = 0.2


@register_distiller("wttm", tags=("classic",))
class WTTM(TTM):
    """Weighted TTM at the logits spot: the TTM term of each sample weighted by U_i = sum_c p_t,c^l; weights CE 1,
    WTTM 4 at l = 0.2.

    Follows zkxufo/TTM: distiller_zoo/wttm.py, `WTTM.forward` (batch mean of U_i * KL_i). U_i is a constant, as in
    the reference, whose teacher runs under no_grad (helper/loops.py); here it stays a constant even when the
    teacher is trained jointly (`detach_teacher = False`), so only the KL reaches the teacher.

    Defaults. The repository's only WTTM example is WTTM added to CRD (README: `--distill crd --add wttm
    --ttm_l 0.2 -b 0.8 -a 4`): l = 0.2 and weight 4 on the WTTM term. They are taken for WTTM alone because they
    are the only published WTTM setting, and TTM's weight 45 would not transfer: U_i >= 1 and up to C^(1-l)
    (about 40 for 100 classes at l = 0.2), so the weighted term is an order of magnitude larger than TTM's.
    Per-pair values are in the paper's appendix A.4, not in the repository; no ImageNet default is claimed.
    """

    name = "wttm"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=4.0, spots=(-1,))
    config_class = WTTMConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: WTTMConfig = WTTMConfig(),
                 context=None) -> None:
        super().__init__(spot_names, student_shapes, teacher_shapes, TTMConfig(power=config.power), context)

    def per_sample(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The per-sample term of this method."""
        return wttm_loss(student, teacher, self.power)
