"""AT: Zagoruyko and Komodakis, "Paying More Attention to Attention" (ICLR 2017)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import Distiller, DistillerDefaults, masked_mean
from adakd.distillers.connectors import pool_to_common_size, require_maps
from adakd.distillers.registry import register_distiller


def attention_map(feat: Tensor, p: float) -> Tensor:
    """a(f) = normalise(mean over channels of f^p, flattened): [B, C, H, W] -> unit-norm [B, H*W]."""
    return F.normalize(feat.pow(p).mean(1).flatten(1), dim=1)


def token_attention_map(tokens: Tensor, p: float) -> Tensor:
    """The token analogue of a(f): normalise(mean over channels of t^p): [B, N, C] -> unit-norm [B, N]."""
    return F.normalize(tokens.pow(p).mean(2), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Per-sample attention transfer: mean over positions of (a(f_s) - a(f_t))^2.

    Follows HobbitLong/RepDistiller:distiller_zoo/AT.py: the larger map is adaptive-average-pooled to the
    smaller, and its loss (a mean over batch and positions) equals the batch mean of these values. Departure
    from the paper, shared with the authors' code and the CRD benchmark: the paper writes the 2-norm of the
    difference (beta/2 * ||a_s - a_t||_2), the code takes the mean of its square (with weight 1000).
    """
    dtype = torch.promote_types(student_feat.dtype, torch.float32)
    if student_feat.dim() == 3:  # token maps [B, N, C] of a vision transformer: one position per token
        return (token_attention_map(student_feat.to(dtype), p)
                - token_attention_map(teacher_feat.to(dtype), p)).pow(2).mean(1)
    student_feat, teacher_feat = pool_to_common_size(student_feat.to(dtype), teacher_feat.to(dtype))
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean(1)


@dataclass(frozen=True)
class ATConfig:
    """AT hyper-parameters."""

    p: float = 2.0


@register_distiller("at", tags=("classic",))
class AT(Distiller):
    """Attention transfer at every body stage, one term per stage; weights CE 1, AT 1000 (recipes.md §3).

    adakd extension: at a spot where both networks give token maps [B, N, C] (vision transformers) the attention
    is taken over tokens, normalise(mean_c t^2), which is AT's map with one position per token.
    """

    name = "at"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=1000.0, spots=("stages",))
    config_class = ATConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: ATConfig = ATConfig(), context=None) -> None:
        super().__init__(spot_names)
        tokens = [len(s) == 2 and len(t) == 2 for s, t in zip(student_shapes, teacher_shapes)]
        for spot, s, t, is_tokens in zip(spot_names, student_shapes, teacher_shapes, tokens):
            if is_tokens and s[0] != t[0]:
                raise ValueError(f"at compares token attention at spot {spot!r}, but the student has {s[0]} tokens "
                                 f"and the teacher {t[0]}; give both the same patch grid (img_size / patch_size)")
        # Token maps (transformers) compare attention over tokens; any other spot must be a spatial map on both.
        require_maps("at", [n for n, k in zip(spot_names, tokens) if not k],
                     *[[shape for shape, k in zip(shapes, tokens) if not k] for shapes in (student_shapes,
                                                                                          teacher_shapes)])
        self.p = config.p

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        return {
            f"at/{spot}": masked_mean(at_loss(s, self.teacher_input(t), self.p), m)
            for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks)
        }
