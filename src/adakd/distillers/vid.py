"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.registry import register_distiller


def vid_loss(pred_mean: Tensor, teacher_feat: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-sample mean over (C, H, W) of ½·[(μ - t)² / σ² + log σ²], with σ²_c = softplus(log_scale_c) + eps.

    The Gaussian negative log-likelihood (constant dropped) of the teacher feature t under a mean μ regressed from
    the student and a learned per-channel variance (Ahn et al., CVPR 2019). Follows
    HobbitLong/RepDistiller:distiller_zoo/VID.py (the authors' code), which averages over every element where the paper
    sums over channels and positions. Float32 under AMP.
    """
    dtype = torch.promote_types(pred_mean.dtype, torch.float32)
    variance = (F.softplus(log_scale.to(dtype)) + eps).view(1, -1, *[1] * (pred_mean.dim() - 2))
    nll = 0.5 * ((pred_mean.to(dtype) - teacher_feat.to(dtype)).pow(2) / variance + variance.log())
    return nll.flatten(1).mean(dim=1)


@dataclass(frozen=True)
class VIDConfig:
    """VID hyper-parameters; `mid_channels` None means C_mid = C_t, as in the CRD benchmark."""

    init_pred_var: float = 5.0
    eps: float = 1e-5
    mid_channels: int | None = None


def _regressor(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convs without bias or BN: C_s -> C_mid -> C_mid -> C_t with ReLUs between (the reference's regressor)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, 1, bias=False),
    )


@register_distiller("vid", tags=("classic",))
class VID(Distiller):
    """Variational information distillation at every body stage, one regressor and variance vector per spot."""

    name = "vid"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1.0, spots=("stages",))
    config_class = VIDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: VIDConfig = VIDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        for spot, s, t in zip(spot_names, student_shapes, teacher_shapes):
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"vid regresses feature maps (C, H, W); at {spot} the student gives {s} and the "
                                 f"teacher {t}: choose body-stage spots")
        self.eps = config.eps
        self.regressors = nn.ModuleList(
            _regressor(s[0], config.mid_channels or t[0], t[0]) for s, t in zip(student_shapes, teacher_shapes))
        # As in the reference, softplus(log_scale) + eps starts exactly at init_pred_var.
        start = math.log(math.expm1(config.init_pred_var - config.eps))
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t[0],), start)) for t in teacher_shapes)

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        terms = {}
        for spot, s, t, m, regressor, log_scale in zip(self.spot_names, student_feats, teacher_feats, masks,
                                                       self.regressors, self.log_scales):
            t = self.teacher_input(t)
            size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
            # Pool only on a mismatch: the larger map is averaged down to the smaller, as in the reference.
            s = s if s.shape[2:] == size else F.adaptive_avg_pool2d(s, size)
            t = t if t.shape[2:] == size else F.adaptive_avg_pool2d(t, size)
            terms[f"vid/{spot}"] = masked_mean(vid_loss(regressor(s), t, log_scale, self.eps), m)
        return terms
