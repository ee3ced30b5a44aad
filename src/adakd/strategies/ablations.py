"""The ablations of SAKD ([P] Tables VII-VIII; specs/sakd.md §11): always, random and none.

None of them has a policy, adapters, a routing forward or an agent optimiser. Anti (`anti`, `anti-faithful`) and
the trainable-teacher ablation (`sakd-trainable-teacher`, `sakd-faithful-trainable-teacher`, switch
`teacher_trainable`) keep the adaptive step and live in sakd.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from adakd.numerics import cross_entropy_upcast
from adakd.strategies.base import Strategy
from adakd.strategies.registry import register_strategy
from adakd.strategies.sakd import SpotMasked, sample_uniform


class _FixedMasks(SpotMasked):
    """The SAKD student step with masks that no policy learns; subclasses implement `draw_masks`."""

    def draw_masks(self, batch: int, device: torch.device) -> Tensor:
        """Float 0/1 masks [B, K]."""
        raise NotImplementedError

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """Teacher and student forwards, masked terms, one student step."""
        with self.precision.autocast():
            teacher_out = self.teacher(images, preact=self.teacher_preact)
            student_out = self.student(images, preact=self.student_preact)
            masks = self.draw_masks(images.shape[0], images.device)
            terms = self.student_terms(student_out, teacher_out, targets, indices, epoch, masks)
        loss = self.student_update(terms)
        out = {name: value.detach() for name, value in terms.items()}
        out.update(self.share_terms(masks))
        out.update(self.component_metrics())
        out["loss"] = loss.detach()
        out["correct"] = (student_out.features[-1].detach().argmax(dim=1) == targets).sum()
        return out


@register_strategy("always")
class Always(_FixedMasks):
    """Always ("Stan." in [P]): CE + beta1 KL + beta2 KD on every sample at every spot ([C] train_baseline.py).

    Same numbers as `standard` up to float rounding of the all-ones masked mean; it also logs shares (all 1).
    """

    def draw_masks(self, batch: int, device: torch.device) -> Tensor:
        """All ones."""
        return torch.ones(batch, self.layout.num_decisions, device=device)


@dataclass(frozen=True)
class RandomOptions:
    """Switches of the Rand ablation (§9, [C] train_random.py)."""

    rand_ce_weight: float = 1.0
    """Extra factor on the CE term: 1 ([P]); [C] multiplies CE by its gamma_r (`classify_weight`)."""
    rand_kl_mask: str = "independent"
    """"independent": the logits decision is drawn like the others; "tied": it copies the last feature decision, as
    [C] does for AT, NST and VID."""

    def __post_init__(self) -> None:
        if self.rand_kl_mask not in ("independent", "tied"):
            raise ValueError(f"strategy option rand_kl_mask must be 'independent' or 'tied', not {self.rand_kl_mask!r}")


@register_strategy("random")
class Random(_FixedMasks):
    """Rand: every decision i.i.d. Bernoulli(0.5) per sample, spot and iteration, from the torch RNG."""

    option_class = RandomOptions

    @property
    def ce_weight(self) -> float:
        """CE weight times `rand_ce_weight`."""
        return self.weights.ce * self.options.rand_ce_weight

    def draw_masks(self, batch: int, device: torch.device) -> Tensor:
        """Bernoulli(0.5) masks, the logits column optionally tied to the last feature decision."""
        masks = (sample_uniform((batch, self.layout.num_decisions), device) < 0.5).to(torch.float32)
        if self.options.rand_kl_mask == "tied" and masks.shape[1] > 1:
            masks[:, -1] = masks[:, -2]
        return masks


@register_strategy("none")
class NoDistill(Strategy):
    """No ("S" row of [P]): the student on CE alone; no teacher forward, no distiller term ([C] train_single.py)."""

    temperature_refusal: ClassVar[str] = "it trains the student on CE alone, with no distillation term"

    def param_groups(self) -> dict[str, Any]:
        """The student only: the distiller's heads would never receive a gradient."""
        return {"main": [p for p in self.student.parameters() if p.requires_grad]}

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """Student forward, CE, one SGD step."""
        with self.precision.autocast():
            logits = self.student(images).features[-1]
            ce = self.weights.ce * cross_entropy_upcast(logits, targets)
        self.optimizer_step(self.optimizers["main"], ce)
        return {"ce": ce.detach(), "loss": ce.detach(),
                "correct": (logits.detach().argmax(dim=1) == targets).sum()}
