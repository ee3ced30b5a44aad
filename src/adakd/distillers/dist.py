"""DIST: Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import (Distiller, DistillerDefaults, masked_mean, per_class, relational_term,
                                   require_equal_logits)
from adakd.distillers.registry import register_distiller

# Added to the product of the two norms in the Pearson correlation (the reference's `cosine_similarity` eps).
_PEARSON_EPS = 1e-8


def pearson(a: Tensor, b: Tensor, dim: int, weights: Tensor | None = None) -> Tensor:
    """Pearson correlation of `a` and `b` along `dim`, one value per slice: centred cosine a'.b' / (|a'| |b'| + 1e-8).

    `weights` (0/1, one per entry along `dim`) gives the correlation over the selected entries only: their mean is
    the centre and the others are zeroed, so each slice equals the correlation of its selected sub-vector while
    the shapes stay static. All-ones weights give exactly the unweighted value.
    """
    if weights is None:
        count = a.shape[dim]
        a_centred = a - a.sum(dim, keepdim=True) / count
        b_centred = b - b.sum(dim, keepdim=True) / count
    else:
        shape = [1] * a.dim()
        shape[dim] = -1
        w = weights.to(a.dtype).reshape(shape)
        count = w.sum().clamp(min=1)  # an empty selection keeps a finite (unused) value
        a_centred = (a - (a * w).sum(dim, keepdim=True) / count) * w
        b_centred = (b - (b * w).sum(dim, keepdim=True) / count) * w
    # vector_norm's gradient at a zero vector is 0 (not sqrt's inf): one selected sample stays finite.
    norms = torch.linalg.vector_norm(a_centred, dim=dim) * torch.linalg.vector_norm(b_centred, dim=dim)
    return (a_centred * b_centred).sum(dim) / (norms + _PEARSON_EPS)


def _probabilities(student_logits: Tensor, teacher_logits: Tensor,
                   temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32 under AMP, float64 kept
    return (F.softmax(student_logits.to(dtype) / per_class(temperature), dim=1),
            F.softmax(teacher_logits.to(dtype) / per_class(temperature), dim=1))


def dist_inter(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float) -> Tensor:
    """Per-sample inter-class term T^2 (1 - pearson over classes of softmax(z_s / T)_i and softmax(z_t / T)_i)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        p_student, p_teacher = _probabilities(student_logits, teacher_logits, temperature)
        return temperature**2 * (1.0 - pearson(p_student, p_teacher, dim=1))


def dist_intra(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float,
               weights: Tensor | None = None) -> Tensor:
    """Batch-level intra-class term T^2 (1 - mean_c pearson over the batch of column c of the two softmaxes at T).

    `weights` (0/1 per sample) gives the term of the selected sub-batch (each column's correlation over the selected
    rows only) on the whole batch, as `relational_term` expects. A batch of one has zero centred columns: the
    correlation is 0 and the term the constant T^2, as in the reference. With one temperature per sample ([B],
    CTKD's instance mode) each row is softened at its own T and the batch-level term is scaled by the batch mean of
    T^2 (adakd's choice: the term does not decompose per sample).
    """
    with torch.autocast(student_logits.device.type, enabled=False):
        p_student, p_teacher = _probabilities(student_logits, teacher_logits, temperature)
        scale = temperature**2
        if isinstance(scale, Tensor) and scale.dim() == 1:
            scale = scale.mean()
        return scale * (1.0 - pearson(p_student, p_teacher, dim=0, weights=weights).mean())


@dataclass(frozen=True)
class DISTConfig:
    """DIST hyper-parameters (the authors' CIFAR-100 config: tau 4, beta 1, gamma 1)."""

    temperature: float = 4.0
    beta: float = 1.0  # weight of the inter-class term
    gamma: float = 1.0  # weight of the intra-class term


@register_distiller("dist", tags=("classic",))
class DIST(Distiller):
    """Correlation-based logit distillation at the logits spot: beta * inter-class + gamma * intra-class relation,
    each T^2 (1 - Pearson correlation) of the softened probabilities; weights CE 1, DIST 2, T = 4 (CIFAR-100).

    Follows hunto/image_classification_sota: lib/models/losses/dist_kd.py, `DIST.forward` (with
    `pearson_correlation`, `inter_class_relation`, `intra_class_relation`): the Pearson correlation centres each
    vector and adds eps = 1e-8 to the product of the norms; the inter-class term correlates each sample's class
    probabilities (averaged over the batch), the intra-class term each class's probabilities over the batch
    (averaged over the classes); both are multiplied by tau^2. The total is ori_loss_weight * CE + kd_loss_weight *
    DIST (lib/models/losses/kd_loss.py, `KDLoss`).

    Defaults. CIFAR-100: configs/strategies/distill/dist_cifar.yaml, `kd: dist_t4` (tau 4, beta = gamma = 1),
    `ori_loss_weight: 1`, `kd_loss_weight: 2`. ImageNet: configs/strategies/distill/resnet_dist.yaml, `kd: dist`
    (tau 1, beta = gamma = 1), CE 1, DIST 2, i.e. `method=dist distill.args.temperature=1`.

    Under a SAKD mask: the inter-class term is per sample, so masked-out samples contribute zero to its batch mean
    (`masked_mean`). The intra-class term is batch-level (it does not decompose per sample): it is computed on the
    selected sub-batch, i.e. each column's correlation over the selected rows only (column means and covariances
    weighted by the 0/1 selection weights, static shapes, no host sync), then scaled by the selection's share of
    the batch, as every relational term is (`relational_term`); fewer than 2 selected samples give an intra-class
    term of exactly 0. Departure: the reference has no masks; an unmasked batch gives the reference's value.
    """

    name = "dist"
    learned_temperature = True
    defaults = DistillerDefaults(ce_weight=1.0, method_weight=2.0, spots=(-1,))
    config_class = DISTConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: DISTConfig = DISTConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_equal_logits("dist", spot_names, student_shapes, teacher_shapes)
        self.config = config

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        c = self.config
        temperature = self.temperature_at(c.temperature)
        intra = partial(dist_intra, temperature=temperature)
        terms = {}
        for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks):
            t = self.teacher_input(t)
            terms[f"dist/{spot}"] = (c.beta * masked_mean(dist_inter(s, t, temperature), m)
                                     + c.gamma * relational_term(intra, s, t, m))
        return terms
