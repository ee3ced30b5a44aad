"""OFD: Heo, Kim, Yun, Park, Kwak and Choi, "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019).

Follows megvii-research/mdistiller@a08d46f10d6102bd6e3f258ca5ac880b020ea259 mdistiller/distillers/OFD.py
(`feat_loss`, `ConnectorConvBN`, `OFD.init_ofd_modules`, `OFD.ofd_loss`) and its cfg (OFD.LOSS.CE_WEIGHT 1,
FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1): pre-ReLU student and teacher features of every body stage, the
student's through a Conv-BN connector, the teacher's average-pooled to the student's size, a partial L2 distance
against a per-channel margin from the teacher's BatchNorm before each ReLU, stage i of n weighted 1 / 2^(n-1-i).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import require_maps
from adakd.distillers.registry import register_distiller

# Below this probability of a negative response the margin is -3 sigma, as the reference (norm.cdf(-m/s) > 0.001).
MIN_NEGATIVE_PROBABILITY = 1e-3


def bn_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """Per channel E[x | x < 0] for x ~ N(bias, |weight|^2): m - s phi(m/s) / Phi(-m/s), in float64.

    The paper's margin (eq. 3): the expected negative response of the teacher's BN output before its ReLU, with the
    BN's affine parameters as the response's mean and standard deviation. As the reference, -3 s where
    Phi(-m/s) <= 0.001. Numerical guard (the reference divides by zero there): s = 0 gives the limit min(m, 0).
    """
    s, m = weight.detach().double().abs(), bias.detach().double()
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    z = m / safe_s
    negative_probability = torch.special.ndtr(-z)
    density = torch.exp(-z.pow(2) / 2) / math.sqrt(2 * math.pi)
    usable = negative_probability > MIN_NEGATIVE_PROBABILITY
    conditional = m - safe_s * density / torch.where(usable, negative_probability, torch.ones_like(z))
    margin = torch.where(usable, conditional, -3 * s)
    return torch.where(s > 0, margin, m.clamp(max=0))


def ofd_loss(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Per-sample partial L2 summed over (C, H, W); `margin` [C] per teacher channel.

    Element terms, as the reference's `feat_loss`: (s - m)^2 where s > m >= t (a teacher response at or below the
    margin only pulls a student above it down to it); (s - t)^2 where s > t, m < t <= 0; (s - t)^2 where t > 0;
    zero elsewhere (the paper's: no loss where both are below the teacher's negative response). Its batch mean equals
    the reference's `.mean(dim=0).sum()`.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    margin = margin.to(dtype).view(1, -1, *[1] * (student.dim() - 2))
    below = (student > margin) & (teacher <= margin)
    between = (student > teacher) & (teacher > margin) & (teacher <= 0)
    positive = teacher > 0
    loss = ((student - margin).pow(2) * below.to(dtype) + (student - teacher).pow(2) * between.to(dtype)
            + (student - teacher).pow(2) * positive.to(dtype))
    return loss.flatten(1).sum(1)


def conv_bn_connector(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias, stride 1, same padding) then BN, He-normal conv weights over k*k*C_out, BN at 1 and 0."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * out_channels)))
    bn = nn.BatchNorm2d(out_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


@dataclass(frozen=True)
class OFDConfig:
    """OFD hyper-parameter: the connector's kernel size (mdistiller's OFD.CONNECTOR.KERNEL_SIZE)."""

    connector_kernel: int = 1

    def __post_init__(self) -> None:
        if self.connector_kernel < 1 or self.connector_kernel % 2 == 0:
            raise ValueError(f"ofd connector_kernel must be a positive odd size (the connector keeps the map's size), "
                             f"not {self.connector_kernel}")


@register_distiller("ofd", tags=("classic",))
class OFD(Distiller):
    """Overhaul of feature distillation on pre-ReLU body-stage features; one term per spot.

    Margins are buffers filled from the teacher's BN before each spot's ReLU when `create` builds the distiller
    (`read_networks`; `StagedModel.preact_batchnorms` names them, and refuses a teacher that declares none). Built
    directly from shapes, a distiller holds the margin of a freshly initialised BN (weight 1, bias 0) until then.
    Departures from the reference: spots of networks with different stage counts pair by spatial size
    (`create`), where mdistiller keeps the last min(n_s, n_t) stages of each; the stage weights 1 / 2^(n-1-i) are
    inside each term; per-sample terms, so masks apply; the margin's s = 0 guard (`bn_margin`).
    """

    name = "ofd"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=0.001, spots=("stages",))
    config_class = OFDConfig
    student_preact = True
    teacher_preact = True
    preacts_required = True  # the signs (AB) / margins (OFD) of pre-activations: no stand-in

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: OFDConfig = OFDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_maps("ofd", spot_names, student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(
            conv_bn_connector(s[0], t[0], config.connector_kernel) for s, t in zip(student_shapes, teacher_shapes))
        count = len(spot_names)
        self.stage_weights = [1.0 / 2 ** (count - 1 - i) for i in range(count)]
        for i, t in enumerate(teacher_shapes):
            fresh = bn_margin(torch.ones(t[0]), torch.zeros(t[0])).float()
            self.register_buffer(f"margin{i}", fresh)

    def margins(self) -> list[Tensor]:
        """The per-channel margin of each spot, [C_t]."""
        return [getattr(self, f"margin{i}") for i in range(len(self.spot_names))]

    def read_networks(self, student, teacher, student_spots, teacher_spots) -> None:
        """Fill the margins from the teacher's BN before each spot's ReLU; refuse students without pre-activations."""
        if not student.has_layout:
            raise ValueError(f"ofd distills pre-ReLU student features, but {type(student.model).__name__} is staged "
                             "automatically (timm/torchvision) and its stages give post-ReLU outputs only; choose a "
                             "zoo student")
        for i, bn in enumerate(teacher.preact_batchnorms(teacher_spots, "ofd")):
            margin = getattr(self, f"margin{i}")
            if bn.weight is None or bn.weight.shape != margin.shape:
                raise ValueError(f"ofd needs an affine BatchNorm of {margin.numel()} channels before the teacher's "
                                 f"ReLU at {teacher.stage_names[teacher_spots[i]]}, found {bn}")
            margin.copy_(bn_margin(bn.weight, bn.bias).to(margin))

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        terms = {}
        for spot, connector, s, t, m, margin, weight in zip(self.spot_names, self.connectors, student_feats,
                                                            teacher_feats, masks, self.margins(), self.stage_weights):
            projected = connector(s)
            t = self.teacher_input(t)
            if t.shape[-2:] != projected.shape[-2:]:
                t = F.adaptive_avg_pool2d(t, projected.shape[-2:])
            terms[f"ofd/{spot}"] = masked_mean(ofd_loss(projected, t, margin), m) * weight
        return terms
