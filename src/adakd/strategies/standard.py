"""The standard strategy: every sample distilled at every spot, every step."""
from __future__ import annotations

import torch
from torch import Tensor

from adakd.distillers.kd import kd_loss
from adakd.numerics import cross_entropy_upcast
from adakd.strategies.base import Strategy, split_task_and_distillation
from adakd.strategies.registry import register_strategy


@register_strategy("standard")
class Standard(Strategy):
    """total = ce * CE + kl * KD_T + method * sum of the distiller's per-spot terms.

    With no teacher this trains a model alone (task=train, e.g. a teacher from scratch).
    """

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """Forward student and teacher, weight the terms, one backward and one SGD step."""
        student_preact = bool(getattr(self.distiller, "student_preact", False))
        teacher_preact = bool(getattr(self.distiller, "teacher_preact", False))
        with self.precision.autocast():
            student_out = self.student(images, preact=student_preact)
            logits = student_out.features[-1]
            terms = {"ce": self.weights.ce * cross_entropy_upcast(logits, targets)}
            if self.teacher is not None:
                teacher_out = self.teacher(images, preact=teacher_preact)
                temperature = self.step_temperature(logits, teacher_out.features[-1])
                if self.distiller is not None:
                    with self.distilling_at(temperature):
                        named = self.distiller_forward(
                            self.select(student_out, self.student_spots, student_preact),
                            self.select(teacher_out, self.teacher_spots, teacher_preact),
                            targets,
                            indices=indices,
                            epoch=epoch,
                        )
                    terms.update({name: self.weights.method * value for name, value in named.items()})
                if self.weights.kl > 0:
                    kl = kd_loss(logits, teacher_out.features[-1], temperature,
                                 standardize=self.weights.kl_standardize).mean()
                    terms["kl"] = self.weights.kl * kl
            loss = torch.stack(list(terms.values())).sum()
            task_loss, distill_loss = split_task_and_distillation(terms)
        self.optimizer_step(self.optimizers["main"], task_loss, distill_loss=distill_loss)
        out = {name: value.detach() for name, value in terms.items()}
        out.update(self.component_metrics())
        out["loss"] = loss.detach()
        out["correct"] = (logits.detach().argmax(dim=1) == targets).sum()
        return out
