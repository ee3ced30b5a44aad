"""DIST+: Huang, You, Wang, Qian and Xu, "DIST+: Knowledge Distillation From a Stronger Adaptive Teacher"
(TPAMI 2025)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean, relational_term, require_equal_logits
from adakd.distillers.connectors import ConvReg
from adakd.distillers.dist import dist_inter, dist_intra, pearson
from adakd.distillers.registry import register_distiller


def _float_maps(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(student_map.dtype, torch.float32)  # float32 under AMP, float64 kept
    return student_map.to(dtype), teacher_map.to(dtype)


def channel_relation(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Per-sample channel term 1 - mean over positions (h, w) of the Pearson correlation over the channels of
    f_s[:, h, w] and f_t[:, h, w] ([B, C, H, W] maps of one shape -> [B]).

    The eps 1e-8 is added to the product of the centred norms, as the reference adds it to sqrt(ss_s ss_t). Where a
    map is constant over the channels at a position (a post-ReLU teacher that is 0 there) the correlation is 0 with
    a finite gradient; the reference's sqrt(ss_s * 0) has a NaN gradient there.
    """
    with torch.autocast(student_map.device.type, enabled=False):
        student, teacher = _float_maps(student_map, teacher_map)
        return 1.0 - pearson(student, teacher, dim=1).flatten(1).mean(1)


def spatial_relation(student_map: Tensor, teacher_map: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch-level spatial term 1 - mean over positions of the Pearson correlation over the batch of the
    channel-summed maps sum_c f[:, c, h, w] ([B, C, H, W] maps of one size -> a scalar).

    `weights` (0/1 per sample) gives the term of the selected sub-batch (each position's correlation over the
    selected samples only) on the whole batch, as `relational_term` expects.
    """
    with torch.autocast(student_map.device.type, enabled=False):
        student, teacher = _float_maps(student_map, teacher_map)
        return 1.0 - pearson(student.sum(1).flatten(1), teacher.sum(1).flatten(1), dim=0, weights=weights).mean()


@dataclass(frozen=True)
class DISTPlusConfig:
    """DIST+ hyper-parameters (torchdistill's sample config: tau 1, beta 2, gamma 2, iota 1, kappa 1)."""

    temperature: float = 1.0
    beta: float = 2.0  # weight of DIST's inter-class term (logits)
    gamma: float = 2.0  # weight of DIST's intra-class term (logits)
    iota: float = 1.0  # weight of the channel relation term (feature map)
    kappa: float = 1.0  # weight of the spatial relation term (feature map)


@register_distiller("dist_plus", tags=("classic",))
class DISTPlus(Distiller):
    """DIST on the logits plus its feature-level extension on the last body stage: at the logits
    beta * inter-class + gamma * intra-class (DIST, `adakd.distillers.dist`); at a feature map
    iota * channel relation + kappa * spatial relation, each 1 - a Pearson correlation; weights CE 1, DIST+ 2.

    Follows yoshitomo-matsubara/torchdistill: torchdistill/losses/mid_level.py, `DISTPlusLoss` (commit 125e988 "Add
    DIST+ loss", read at 3e4373c): its `forward` adds to `DISTLoss` the `channel_relation` of the two feature maps
    (Pearson correlation over the channels at each position, averaged over batch and positions) and their
    `spatial_relation` (the maps summed over the channels, then DIST's relation over the batch at each position,
    averaged over the positions). Defaults: configs/sample/ilsvrc2012/dist_plus/resnet18_from_resnet34.yaml, the
    only published DIST+ config: CE weight 1, DISTPlusLoss weight 2 with tau 1, beta 2, gamma 2, iota 1, kappa 1 on
    the logits and layer4's output (adakd's last body stage, spot -3). DIST's own CIFAR-100 config uses T 4 and
    beta = gamma = 1 (method `dist`); give them with distill.args.

    Departures:
    - The channel term is 1 - correlation. torchdistill adds the mean correlation itself, `iota *
      channel_relation`, which minimises the correlation (pushes the student's channels to anti-correlate with the
      teacher's); the spatial term and DIST's terms are all 1 - correlation, as the paper's "extension of the DIST
      loss from the logit level to the feature level" is. The value is iota * (1 - c) where torchdistill has iota * c.
    - Where the two maps differ in shape (another channel count or size), the student's map goes through a
      connector trained with the student: FitNets' ConvReg without the ReLU (a 1x1 conv and BN for another channel
      count). torchdistill's DIST+ has none (its sample pair has 512 channels on both sides); maps of one shape are
      compared as they are.
    - The paper's teacher acclimation is not part of the loss (torchdistill's DISTPlusLoss has none either).

    Under a SAKD mask: DIST's terms are masked as in `dist`; the channel term is per sample (`masked_mean`); the
    spatial term, a relation over the batch, is the selected sub-batch's, times its share (`relational_term`;
    fewer than 2 selected samples give 0). An unmasked batch gives the reference's value (with the channel sign
    above). A vector spot (logits) gets DIST's terms, a (C, H, W) spot the feature terms; token maps are refused.
    """

    name = "dist_plus"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=2.0, spots=(-1, -3))
    config_class = DISTPlusConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: DISTPlusConfig = DISTPlusConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        self.config = config
        self.is_map = []
        connectors = []
        for spot, s, t in zip(spot_names, student_shapes, teacher_shapes):
            s, t = tuple(s), tuple(t)
            if len(s) == 3 and len(t) == 3:
                self.is_map.append(True)
                connectors.append(nn.Identity() if s == t else ConvReg(s, t, relu=False))
            elif len(s) == 1 and len(t) == 1:
                require_equal_logits("dist_plus", [spot], [s], [t])
                self.is_map.append(False)
                connectors.append(nn.Identity())
            else:
                raise ValueError(f"dist_plus compares logit vectors (C,) or spatial maps (C, H, W), but spot {spot!r} "
                                 f"has student {s} and teacher {t}; choose the logits and body-stage spots "
                                 f"(distill.spots=[-1,-3])")
        self.connectors = nn.ModuleList(connectors)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        c = self.config
        intra = partial(dist_intra, temperature=c.temperature)
        terms = {}
        for spot, is_map, connector, s, t, m in zip(self.spot_names, self.is_map, self.connectors, student_feats,
                                                     teacher_feats, masks):
            t = self.teacher_input(t)
            if is_map:
                s = connector(s)
                terms[f"dist_plus/{spot}"] = (c.iota * masked_mean(channel_relation(s, t), m)
                                              + c.kappa * relational_term(spatial_relation, s, t, m))
            else:
                terms[f"dist_plus/{spot}"] = (c.beta * masked_mean(dist_inter(s, t, c.temperature), m)
                                              + c.gamma * relational_term(intra, s, t, m))
        return terms
