"""AB: Heo, Lee, Yun and Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons" (AAAI 2019), as the CRD benchmark (HobbitLong/RepDistiller, commit b84f547) runs it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import ConvReg, require_maps
from adakd.distillers.registry import register_distiller

# RepDistiller's ABLoss divides each spot's summed loss by the batch and multiplies it by 3 / 1000.
_SCALE = 3.0 / 1000.0


def ab_loss(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0) -> Tensor:
    """Per-sample alternative L2 loss of activation boundaries, summed over C, H, W.

    For each neuron: (s + m)^2 where the teacher is inactive (t <= 0) but s > -m, plus (s - m)^2 where the teacher
    is active (t > 0) but s <= m; s the connected student pre-activation, t the teacher's, m the margin. Follows
    HobbitLong/RepDistiller:distiller_zoo/AB.py `ABLoss.criterion_alternative_l2` (b84f547), whose sum over the
    batch divided by the batch size is the batch mean of these values. The teacher enters only through its signs, so
    no gradient reaches it.
    """
    dtype = torch.promote_types(student_preact.dtype, torch.float32)
    s, t = student_preact.to(dtype), teacher_preact.to(dtype)
    below = (s + margin).pow(2) * ((s > -margin) & (t <= 0)).to(dtype)
    above = (s - margin).pow(2) * ((s <= margin) & (t > 0)).to(dtype)
    return (below + above).flatten(1).sum(1)


def spot_weights(count: int) -> list[float]:
    """RepDistiller's per-spot weights 2^(i - n + 1): the deepest spot 1, each shallower one half the next."""
    return [2.0 ** (i - count + 1) for i in range(count)]


def ab_connector(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """Identity when channels and height agree, else FitNets' ConvReg without its ReLU (RepDistiller `Connector`)."""
    if student_shape[0] == teacher_shape[0] and student_shape[1] == teacher_shape[1]:
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, relu=False)


@dataclass(frozen=True)
class ABConfig:
    """AB hyper-parameters: the margin and the initialisation stage (RepDistiller `--init_epochs 30`, lr: the run's)."""

    margin: float = 1.0
    pretrain_epochs: int = 30
    pretrain_lr: float | None = None

    def __post_init__(self) -> None:
        if self.margin <= 0:
            raise ValueError(f"ab margin must be > 0, not {self.margin}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"ab pretrain_epochs must be >= 0, not {self.pretrain_epochs}")


@register_distiller("ab", tags=("classic",))
class AB(Distiller):
    """Activation-boundary transfer at every body stage's pre-activation, in an initialisation stage.

    As RepDistiller's train_student.py (`--distill abound`) and helper/pretrain.py `init`: before training, 30 epochs
    of SGD (the run's lr, momentum 0.9, wd 5e-4, constant) on the sum over spots of w_i * 3/1000 * batch mean of
    `ab_loss`, over the student's body and the connectors (teacher in eval mode, its features without gradient); then
    plain training. Its distillation stage adds no AB term (helper/loops.py: `loss_kd = 0` for abound, so the
    `-a 0 -b 1` of scripts/run_cifar_distill.sh weigh a zero): method_weight 0, CE 1. A positive
    distill.method_weight keeps the term in distillation through the connectors as initialised (frozen: RepDistiller
    keeps them out of its optimiser), masked per sample.

    Spots: every body stage f1..fN, RepDistiller's feat[1:-1] with preact=True on both networks. Departures from the
    paper: the paper's initialisation transfers at one layer's boundaries with its own schedule; this is the CRD
    benchmark's multi-stage version. The student's classifier gets no gradient in the stage (RepDistiller trains
    only `get_feat_modules()`); its BatchNorm layers run in training mode there, as those modules do.
    """

    name = "ab"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=0.0, spots=("stages",))
    config_class = ABConfig
    student_preact = True
    teacher_preact = True
    preacts_required = True  # the signs (AB) / margins (OFD) of pre-activations: no stand-in
    pretrain_trains_student = True

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: ABConfig = ABConfig(), context=None) -> None:
        super().__init__(spot_names)
        require_maps("ab", spot_names, student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(ab_connector(tuple(s), tuple(t)) for s, t in zip(student_shapes, teacher_shapes))
        self.margin = config.margin
        self.weights = spot_weights(len(spot_names))
        self.pretrain_epochs = config.pretrain_epochs
        self.pretrain_lr = config.pretrain_lr

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """The connectors, trained with the student's body in the initialisation stage, then frozen."""
        return list(self.connectors.parameters())

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"ab/{spot}": weight * _SCALE * masked_mean(ab_loss(connector(s), self.teacher_input(t), self.margin), m)
            for spot, weight, connector, s, t, m in zip(self.spot_names, self.weights, self.connectors,
                                                       student_feats, teacher_feats, masks)
        }
