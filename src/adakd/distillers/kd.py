"""KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean, per_class
from adakd.distillers.registry import register_distiller

# Added to the standard deviation (outside the square root) in logit standardisation, as the LS reference does.
_STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Logit standardisation (LS): each sample's logits z-scored over the classes, (z - mean) / (std + 1e-7).

    Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge Distillation" (CVPR 2024); follows
    sunshangquan/logit-standardization-KD: mdistiller/distillers/KD.py, `normalize` (the same in DKD.py): the std is
    torch.std's unbiased (n - 1) estimator and the eps is added to it. The one z-scoring of adakd, used by KD, DKD
    and the extra KL term (`distill.kl_standardize`); the method's own temperature then divides the z-scores as the
    LS "base temperature". Computed in float32 under AMP.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + _STANDARDIZE_EPS)


def require_classes_to_standardize(method: str, logit_sizes) -> None:
    """Refuse logit standardisation on fewer than 2 classes: the unbiased std of one logit is undefined (NaN)."""
    classes = min(int(size[0]) for size in logit_sizes) if logit_sizes else 2
    if classes < 2:
        raise ValueError(f"{method} with standardize: true needs at least 2 classes, got {classes}: the standard "
                         f"deviation of a single logit is undefined; set distill.args.standardize=false")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float,
            detach_teacher: bool = True, standardize: bool = False) -> Tensor:
    """Per-sample T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes.

    Follows HobbitLong/RepDistiller:distiller_zoo/KD.py (KL summed over classes, averaged over the batch by the
    caller, times T^2 so gradients keep their scale as T changes). Computed in float32 under AMP. The teacher's
    distribution is a constant unless `detach_teacher` is False (a teacher trained jointly with the student).
    `standardize`: both logit sets are z-scored first (`standardize_logits`, LS) and T is LS's base temperature;
    T^2 is kept, as LS's `kd_loss` keeps it. `temperature` may be a tensor in the graph (CTKD's learned one): a
    scalar, or one per sample ([B], each sample's KL at its own T times its own T^2).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    teacher_logits = teacher_logits.detach() if detach_teacher else teacher_logits
    if standardize:
        student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
    divisor = per_class(temperature)
    log_p_student = F.log_softmax(student_logits.to(dtype) / divisor, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / divisor, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl * temperature**2


@dataclass(frozen=True)
class KDConfig:
    """KD hyper-parameters; `standardize` z-scores both logit sets first (logit standardisation, LS, CVPR 2024)."""

    temperature: float = 4.0
    standardize: bool = False


@register_distiller("kd", tags=("classic",))
class KD(Distiller):
    """Vanilla logit distillation at the logits spot; the field's weights are CE 0.1 and KD 0.9.

    `standardize: true` is KD with logit standardisation (LS): see `standardize_logits`; LS's CIFAR-100 recipe is
    the preset ls-kd (T 2, CE 0.1, KD 9) and its per-pair values are `LS_CIFAR100_PAIRS`.
    """

    name = "kd"
    learned_temperature = True
    defaults = DistillerDefaults(ce_weight=0.1, method_weight=0.9, spots=(-1,))
    config_class = KDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: KDConfig = KDConfig(), context=None) -> None:
        super().__init__(spot_names)
        for s, t in zip(student_shapes, teacher_shapes):
            if s != t:
                raise ValueError(f"kd needs logits of equal size; student {s} vs teacher {t}")
        if config.standardize:
            require_classes_to_standardize("kd", student_shapes)
        self.temperature = config.temperature
        self.standardize = config.standardize

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        temperature = self.temperature_at(self.temperature)
        return {
            f"kd/{spot}": masked_mean(
                kd_loss(s, t, temperature, detach_teacher=self.detach_teacher, standardize=self.standardize), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }


# LS's per-pair CIFAR-100 values: pair -> (KD+LS base temperature, KD weight, DKD+LS base temperature, alpha, beta).
_LS_CIFAR100 = {
    "resnet32x4-resnet8x4": (2.0, 9.0, 2.0, 9.0, 72.0),
    "vgg13-vgg8": (3.0, 9.0, 2.0, 15.0, 30.0),
    "wrn_40_2-wrn_40_1": (2.0, 9.0, 2.0, 12.0, 24.0),
    "wrn_40_2-wrn_16_2": (2.0, 9.0, 2.0, 12.0, 24.0),
    "resnet56-resnet20": (2.0, 9.0, 3.0, 18.0, 36.0),
    "resnet110-resnet32": (2.0, 9.0, 2.0, 15.0, 30.0),
    "resnet110-resnet20": (4.0, 12.0, 2.0, 15.0, 30.0),
    "resnet32x4-ShuffleV2": (2.0, 9.0, 2.0, 9.0, 72.0),
    "resnet32x4-wrn_16_2": (3.0, 9.0, 2.0, 9.0, 18.0),
    "resnet32x4-wrn_40_2": (3.0, 9.0, 2.0, 9.0, 72.0),
    "wrn_40_2-resnet8x4": (2.0, 9.0, 2.0, 18.0, 36.0),
    "wrn_40_2-MobileNetV2": (3.0, 9.0, 2.0, 15.0, 30.0),
    "vgg13-MobileNetV2": (3.0, 9.0, 3.0, 9.0, 18.0),
    "ResNet50-MobileNetV2": (3.0, 1.0, 2.0, 15.0, 30.0),
}

LS_CIFAR100_PAIRS: dict[str, dict[str, dict]] = {
    pair: {
        "kd": {"ce_weight": 0.1, "method_weight": kd_weight,
               "args": {"standardize": True, "temperature": kd_temperature}},
        "dkd": {"ce_weight": 1.0, "method_weight": 1.0,
                "args": {"standardize": True, "temperature": dkd_temperature, "alpha": alpha, "beta": beta}},
    }
    for pair, (kd_temperature, kd_weight, dkd_temperature, alpha, beta) in _LS_CIFAR100.items()
}
"""Logit standardisation's CIFAR-100 values per teacher-student pair, as `distill.by_method` entries for a grid.

Source: sunshangquan/logit-standardization-KD, the log files the README links from each table cell, named
`TYPE,teacher,student,BASE_TEMP,KD_WEIGHT[,DKD_BETA].txt` (no per-pair config is in the repository), applied as
tools/train.py does with `--logit-stand`: KD gets T = BASE_TEMP and KD weight = KD_WEIGHT (CE stays at LS's cfg
default 0.1); DKD gets T = BASE_TEMP, alpha = 1 * KD_WEIGHT and beta = DKD_BETA * KD_WEIGHT (DKD_BETA defaults to 8
when the name has none), CE 1 and the 20-epoch warm-up. Pair names are adakd's pair presets (MobileNetV2 is the CRD
benchmark's width-0.5 one). The LS defaults `--base-temp 2 --kd-weight 9` are the presets ls-kd and ls-dkd
(resnet32x4 -> resnet8x4's values) and each pair's values the preset ls-<pair> (e.g. ls-vgg13-vgg8, given after
pair-vgg13-vgg8); ImageNet has no published per-pair values (LS issue #31: use 2 and 9).

CTKD+LS and MLKD+LS, whose values are not per-pair KD/DKD settings, are rows of the grid `ls-table`: CTKD+LS uses
KD weight 9 (CE 0.1) on every pair with the learned temperature (`components.ctkd`); MLKD+LS uses T 2 and weight 9,
except weight 6 on vgg13 -> vgg8, resnet32x4 -> ShuffleV2 and vgg13 -> MobileNetV2, with MLKD's 480/960-epoch,
two-view recipe (preset mlkd-recipe).
"""
