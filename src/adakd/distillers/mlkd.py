"""MLKD: Jin, Wang and Lin, "Multi-Level Logit Distillation" (CVPR 2023)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from adakd.distillers.base import (Distiller, DistillerDefaults, masked_mean, relational_term, require_equal_logits,
                                   selection_weights)
from adakd.distillers.kd import kd_loss, require_classes_to_standardize
from adakd.distillers.registry import register_distiller

# The reference's fixed temperatures beside the configured one, in its order: {T, 3, 5, 2, 6}.
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
MASK_FORMS = ("scale", "select")


def percentile(values: Tensor, q: float, weights: Tensor | None = None) -> Tensor:
    """The q-th percentile of `values` (1-D) with np.percentile's default linear interpolation, on the device.

    `weights` (0/1 per entry) gives the percentile of the selected entries only, with static shapes: unselected
    entries sort last as +inf and the interpolation position counts the selected ones, so nothing waits for the
    device (the reference's np.percentile(x.cpu()) syncs every step). No selected entry gives 0.
    """
    if weights is None:
        weights = torch.ones_like(values)
    selected = weights > 0.5
    ordered = torch.sort(torch.where(selected, values, torch.full_like(values, float("inf")))).values
    count = selected.sum()
    last = (count - 1).clamp(min=0)
    position = (count - 1).clamp(min=0).to(values.dtype) * (q / 100.0)
    low = position.floor().long().clamp(max=last)
    high = (low + 1).clamp(max=last)
    # gather, not ordered[low]: indexing with a 0-d tensor reads it on the host.
    low_value, high_value = ordered.gather(0, low.reshape(1))[0], ordered.gather(0, high.reshape(1))[0]
    value = low_value + (position - low.to(values.dtype)) * (high_value - low_value)
    return torch.where(count > 0, value, torch.zeros_like(value))


def confidence_masks(teacher_logits: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sample mask B, class mask C): the teacher's confidences at or below their batch median (T = 1).

    A sample's confidence is its largest teacher probability; a class's is its teacher probability summed over the
    (selected) samples; each is kept when it is <= the 50th percentile of its kind, as the reference's
    `confidence.le(np.percentile(confidence, 50))` keeps it. Constants (no gradient).
    """
    with torch.no_grad():
        p_teacher = F.softmax(teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)), dim=1)
        if weights is not None:
            p_teacher = p_teacher * weights[:, None]
        confidence = p_teacher.max(dim=1).values
        sample_mask = confidence <= percentile(confidence, 50.0, weights)
        class_confidence = p_teacher.sum(dim=0)
        class_mask = class_confidence <= percentile(class_confidence, 50.0)
    return sample_mask, class_mask


def _probabilities(logits: Tensor, temperature: float, weights: Tensor | None) -> Tensor:
    p = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=1)
    return p if weights is None else p * weights[:, None].to(p.dtype)


def class_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      weights: Tensor | None = None, class_mask: Tensor | None = None) -> Tensor:
    """CC: sum over class pairs of (P_t^T P_t - P_s^T P_s)^2 / C, P = softmax(z / T) (B x C); no T^2.

    `weights` (0/1 per sample) gives the sub-batch's value (unselected rows zeroed); `class_mask` keeps the columns
    c' of the selected classes (the reference's unreduced form).
    """
    with torch.autocast(student_logits.device.type, enabled=False):  # the Gram products in float32 under AMP
        p_student, p_teacher = (_probabilities(z, temperature, weights) for z in (student_logits, teacher_logits))
        squared = (p_teacher.T @ p_teacher - p_student.T @ p_student) ** 2
    if class_mask is not None:
        squared = squared * class_mask.to(squared.dtype)
    return squared.sum() / student_logits.shape[1]


def batch_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                      weights: Tensor | None = None, sample_mask: Tensor | None = None) -> Tensor:
    """BC: sum over sample pairs of (P_t P_t^T - P_s P_s^T)^2 / B, P = softmax(z / T) (B x C); no T^2.

    `weights` (0/1 per sample) gives the sub-batch's value (its pairs, divided by its size); `sample_mask` keeps
    the columns j of the selected samples (the reference's unreduced form).
    """
    with torch.autocast(student_logits.device.type, enabled=False):  # the Gram products in float32 under AMP
        p_student, p_teacher = (_probabilities(z, temperature, weights) for z in (student_logits, teacher_logits))
        squared = (p_teacher @ p_teacher.T - p_student @ p_student.T) ** 2
    if sample_mask is not None:
        squared = squared * sample_mask.to(squared.dtype)
    size = student_logits.shape[0] if weights is None else weights.sum().clamp(min=1)
    return squared.sum() / size


def _kept_share(mask: Tensor, weights: Tensor | None, like: Tensor) -> Tensor:
    """The share of the (selected) entries a confidence mask keeps: the reference's `(scalar * mask).mean()`."""
    kept = mask.to(torch.promote_types(like.dtype, torch.float32))
    if weights is None:
        return kept.mean()
    return (kept * weights).sum() / weights.sum().clamp(min=1)


@dataclass(frozen=True)
class MLKDConfig:
    """MLKD hyper-parameters (the authors' CIFAR-100 values; ImageNet: temperature 1)."""

    temperature: float = 4.0
    standardize: bool = False  # MLKD+LS: z-score the logits of every KD term (not CC/BC), as LS's MLKD.py
    confidence_mask: str = "scale"  # "scale": as the reference computes it; "select": the per-sample selection
    strong_all_temperatures: bool = False  # True: the strong KD terms at T = 2, 6 read the strong view too


@register_distiller("mlkd", tags=("classic",))
class MLKD(Distiller):
    """Multi-level logit distillation at the logits spot: KD at five temperatures plus class- and batch-correlation
    terms, on a weak (and, with data.views: 2, a strong) view; weights CE 0.1, MLKD 0.9, T = 4 (CIFAR-100).

    Follows Jin-Ying/Multi-Level-Logit-Distillation: mdistiller/distillers/KD_ours.py, `KD_ours.forward_train`
    (with `kd_loss`, `cc_loss`, `bc_loss`), HEAD 5ee473f. For T in {T, 3, 5, 2, 6}: KD_T = T^2 KL per sample
    (`kd_loss`), CC_T = sum (G_t - G_s)^2 / C with G = P^T P (C x C), BC_T = sum (G_t - G_s)^2 / B with G = P P^T
    (B x B), P = softmax(z / T); the MLKD weight multiplies every term (the reference multiplies each by
    KD.LOSS.KD_WEIGHT). Confidence masks from the weak view's teacher at T = 1: samples whose top probability is
    <= the batch median, classes whose summed probability is <= the median over classes (`confidence_masks`,
    medians on the device with np.percentile's interpolation: `percentile`).

    The term (one per spot, "mlkd/logits") is, with g the confidence factor of `confidence_mask`:
      sum_T [g KD_T(weak) + g_c CC_T(weak) + g BC_T(weak)]  +  (views 2) sum_T KD_T(strong).
    With data.views: 2 the loader yields [weak; strong] (2B images, targets repeated); the first half is the weak
    view, the second the strong one (`DistillContext.views`). CE is the strategy's, on both views, as the
    reference's `loss_ce` sums both. With one view the strong terms are absent (the weak-view loss).

    Defaults. CIFAR-100: mdistiller's cfg (KD.TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9), configs/cifar100/ours.
    ImageNet (configs/imagenet/r34_r18/kd_ours.yaml): T 1, CE 0.5, MLKD 0.5, i.e. `distill.ce_weight=0.5
    distill.method_weight=0.5 distill.args.temperature=1`. MLKD+LS (`standardize: true`): T 2, weight 9 (LS's
    logs; 6 on vgg13 -> vgg8, resnet32x4 -> ShuffleV2, vgg13 -> MobileNetV2), preset mlkd-ls.

    Reference traps and the choices made:
    - Masks as a scale: `kd_loss` and `bc_loss` are called reduced (`reduce=False` is commented out), so
      `(scalar * mask).mean()` is the scalar times the share of the batch the mask keeps (about 1/2), not a
      selection; likewise CC with the class mask. adakd computes this form by default (`confidence_mask: scale`,
      the published numbers' loss); `confidence_mask: select` is the evident intent: KD per kept sample
      (batch mean with the others at zero), CC over the kept classes' columns c', BC over the kept samples'
      columns j (the reference's unreduced forms).
    - Copy-paste in the strong terms: the reference's strong KD at T = 2 and 6 reads the weak logits. Kept by
      default (published numbers); `strong_all_temperatures: true` reads the strong view at all five.
    - Dead strong CC/BC: `loss_cc_strong` and `loss_bc_strong` are computed but never returned; adakd does not
      compute them.
    - Host syncs: np.percentile on the CPU twice a step in the reference; here on the device (`percentile`).
    - LS (`standardize`) acts on the KD terms only, as LS's MLKD.py: CC, BC and the masks read raw logits.

    Under a SAKD mask / ABL weights (per sample, over all 2B images with two views): the KD terms are per sample
    (`masked_mean` over each view's half); CC and BC are batch-coupled and computed on the selected sub-batch of the
    weak view (`relational_term`), as are the medians behind the confidence masks, so a mask selecting a subset
    gives that subset's loss times its share of the batch.
    """

    name = "mlkd"
    defaults = DistillerDefaults(ce_weight=0.1, method_weight=0.9, spots=(-1,))
    config_class = MLKDConfig

    def __init__(self, spot_names, student_shapes, teacher_shapes, config: MLKDConfig = MLKDConfig(),
                 context=None) -> None:
        super().__init__(spot_names)
        require_equal_logits("mlkd", spot_names, student_shapes, teacher_shapes)
        if config.standardize:
            require_classes_to_standardize("mlkd", student_shapes)
        if config.confidence_mask not in MASK_FORMS:
            raise ValueError(f"mlkd: distill.args.confidence_mask must be one of {MASK_FORMS}, got "
                             f"{config.confidence_mask!r} (scale: as the reference computes it; select: per sample)")
        self.config = config
        self.views = int(getattr(context, "views", 1) or 1)
        self.temperatures = (config.temperature, *EXTRA_TEMPERATURES)

    def _kd(self, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        return kd_loss(student, teacher, temperature, detach_teacher=self.detach_teacher,
                       standardize=self.config.standardize)

    def _relational(self, student: Tensor, teacher: Tensor, weights: Tensor | None = None) -> Tensor:
        """The CC and BC terms of the weak view over every temperature (a batch-coupled loss, sub-batch weights)."""
        sample_mask, class_mask = confidence_masks(teacher, weights)
        if self.config.confidence_mask == "select":
            return sum(class_correlation(student, teacher, t, weights, class_mask)
                       + batch_correlation(student, teacher, t, weights, sample_mask) for t in self.temperatures)
        # The reference's scale form: CC times the kept share of the classes, BC times that of the samples.
        cc = sum(class_correlation(student, teacher, t, weights) for t in self.temperatures)
        bc = sum(batch_correlation(student, teacher, t, weights) for t in self.temperatures)
        return _kept_share(class_mask, None, cc) * cc + _kept_share(sample_mask, weights, bc) * bc

    def weak_kd(self, student: Tensor, teacher: Tensor, weights: Tensor | None) -> Tensor:
        """Per-sample sum over the five temperatures of the weak view's KD, times its confidence factor."""
        sample_mask, _ = confidence_masks(teacher, weights)
        factor = (sample_mask.to(student.dtype) if self.config.confidence_mask == "select"
                  else _kept_share(sample_mask, weights, student))
        return sum(self._kd(student, teacher, t) for t in self.temperatures) * factor

    def forward(self, student_feats, teacher_feats, targets, masks=None, indices=None, epoch=1):
        masks = masks or [None] * len(student_feats)
        terms = {}
        for spot, s, t, m in zip(self.spot_names, student_feats, teacher_feats, masks):
            t = self.teacher_input(t)
            if self.views == 2:
                half = s.shape[0] // 2
                s_weak, s_strong, t_weak, t_strong = s[:half], s[half:], t[:half], t[half:]
                m_weak, m_strong = (None, None) if m is None else (m[:half], m[half:])
            else:
                s_weak, t_weak, m_weak = s, t, m
            weights = None if m_weak is None else selection_weights(m_weak, s_weak)
            term = masked_mean(self.weak_kd(s_weak, t_weak, weights), m_weak)
            term = term + relational_term(self._relational, s_weak, t_weak, m_weak, min_samples=1)
            if self.views == 2:
                term = term + self.strong_kd(s_weak, t_weak, s_strong, t_strong, m_weak, m_strong)
            terms[f"mlkd/{spot}"] = term
        return terms

    def strong_kd(self, s_weak: Tensor, t_weak: Tensor, s_strong: Tensor, t_strong: Tensor,
                  m_weak: Tensor | None, m_strong: Tensor | None) -> Tensor:
        """The strong-view KD terms (unmasked by confidence, as the reference), per sample of the view they read."""
        strong = sum(self._kd(s_strong, t_strong, t) for t in self.temperatures[:3])
        late = self.temperatures[3:]
        if self.config.strong_all_temperatures:
            return masked_mean(strong + sum(self._kd(s_strong, t_strong, t) for t in late), m_strong)
        # The reference's copy-paste: its strong terms at T = 2 and 6 read the weak view's logits.
        return masked_mean(strong, m_strong) + masked_mean(sum(self._kd(s_weak, t_weak, t) for t in late), m_weak)
