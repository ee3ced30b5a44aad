"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019), in the CRD benchmark's form."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller, DistillerDefaults, relational_term, zero_like_loss
from adakd.distillers.registry import register_distiller


def cc_loss(student_embed: Tensor, teacher_embed: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch-relational mean_i sum_d δ_{i,d}·δ_{i+1,d} with δ = |e_s - e_t|, over consecutive samples i, i+1.

    The simplified form the CC authors supplied to HobbitLong/RepDistiller (distiller_zoo/CC.py, issue #15), used
    instead of the paper's kernelised correlation matrices; e_s, e_t are the embedded pooled features. A batch of
    fewer than two samples has no pair and gives a zero (the reference returns NaN). Float32 under AMP.

    `weights` (0/1 per sample) gives the loss of the selected sub-batch on the whole batch: each selected sample
    pairs with the next selected one (consecutive in the sub-batch), found with a suffix minimum instead of
    boolean indexing; the mean is over the n - 1 pairs (at least 1, so fewer than two selected stay finite).
    """
    batch = student_embed.shape[0]
    if batch < 2:
        return zero_like_loss(student_embed)
    dtype = torch.promote_types(student_embed.dtype, torch.float32)
    delta = (student_embed.to(dtype) - teacher_embed.to(dtype)).abs()
    if weights is None:
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
    selected = weights > 0
    position = torch.arange(batch, device=delta.device)
    # following[i] = the first selected position after i (batch if none): a suffix minimum shifted by one.
    at = torch.where(selected, position, batch)
    following = torch.cat([at.flip(0).cummin(0).values.flip(0)[1:], at.new_full((1,), batch)])
    has_pair = selected & (following < batch)
    partner = delta.index_select(0, following.clamp(max=batch - 1))
    products = (delta * partner).sum(dim=1) * has_pair.to(dtype)
    return products.sum() / (weights.to(dtype).sum() - 1).clamp(min=1)


@dataclass(frozen=True)
class CCConfig:
    """CC hyper-parameters: the embedding size, and whether the teacher's embedding head is trained."""

    embed_dim: int = 128
    # specs/sakd.md §9 switch `cc_detach_teacher_embed` (inverted): False detaches the teacher embedding before the
    # loss, so it stays at its random initialisation, as the SAKD code's adaptive and anti scripts (train.py,
    # train_reverse.py) do; the sakd-faithful preset sets it. Its baseline, random and trainable-teacher scripts
    # train the embedding (True).
    teacher_embed_trainable: bool = True


@register_distiller("cc", tags=("classic",))
class CC(Distiller):
    """Correlation congruence on Linear(d -> embed_dim) embeddings of the pooled vectors of student and teacher."""

    name = "cc"
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=0.02, spots=(-2,))
    config_class = CCConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: CCConfig = CCConfig(), context=None) -> None:
        super().__init__(spot_names)
        self.embed_s = nn.ModuleList(nn.Linear(math.prod(shape), config.embed_dim) for shape in student_shapes)
        self.embed_t = nn.ModuleList(nn.Linear(math.prod(shape), config.embed_dim) for shape in teacher_shapes)
        self.teacher_embed_trainable = config.teacher_embed_trainable
        if not config.teacher_embed_trainable:
            self.embed_t.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Both embedding heads, less the teacher's when it is frozen."""
        return [p for p in super().trainable_parameters() if p.requires_grad]

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        terms = {}
        for spot, s, t, m, embed_s, embed_t in zip(self.spot_names, student_feats, teacher_feats, masks,
                                                   self.embed_s, self.embed_t):
            student_embed = embed_s(s.flatten(1))
            teacher_embed = embed_t(self.teacher_input(t).flatten(1))
            if not self.teacher_embed_trainable:  # a constant, even to a teacher trained jointly
                teacher_embed = teacher_embed.detach()
            terms[f"cc/{spot}"] = relational_term(cc_loss, student_embed, teacher_embed, m)
        return terms
