"""DOT: Zhao, Song, Liu, Wang, Qi, Liang, Li and Sun, "DOT: A Distillation-Oriented Trainer" (ICCV 2023).

DOT keeps two momentum buffers per parameter: one for the task loss's gradient at momentum m - delta, one for the
distillation loss's gradient at m + delta, so the distillation direction is followed more steadily than the task
one. It adapts the optimiser, not a loss: it composes with any distiller, under standard and SAKD (where the
distillation loss is the masked one). Reference: megvii-research/mdistiller `mdistiller/engine/dot.py` (`dot()` and
`DistillationOrientedTrainer`) and the `DOT` trainer of `mdistiller/engine/trainer.py` (`init_optimizer`,
`train_iter`); `CFG.SOLVER.DOT.DELTA = 0.075` (cfg.py; its CIFAR-100 configs), 0.09 in its ImageNet configs.

Cost: two backward passes per step (the distillation loss's, keeping the graph, then the task loss's), as the
reference's `train_iter`. Refused: nesterov (the reference has none), ABL (see ABLBase.splits_refusal) and several
ranks (untested here; the reference runs DP, and its issue #52 reports DDP conflicting with the double backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from adakd.options import OptionsError
from adakd.ranks import is_distributed
from adakd.strategies.components import Component, register_component


@dataclass(frozen=True)
class DOTOptions:
    """DOT's one knob."""

    delta: float = 0.075
    """Task momentum = optim.momentum - delta, distillation momentum = optim.momentum + delta (mdistiller cfg
    default and CIFAR-100 configs; its ImageNet configs use 0.09)."""

    def __post_init__(self) -> None:
        if not 0 <= self.delta < 1:
            raise OptionsError("delta", f"must be in [0, 1), got {self.delta}")


class DOTOptimizer(torch.optim.Optimizer):
    """SGD with a task and a distillation momentum buffer per parameter (mdistiller `dot()`, dampening 0).

    Before `step()`, `.grad` holds the task gradient g_t and `distill_grads` the distillation gradient g_d of each
    parameter (in param-group order; None where absent). A parameter with both:
        b_t <- m_t b_t + (g_t + wd p),  b_d <- m_d b_d + g_d,  p <- p - lr b_t - lr b_d
    (weight decay only in the task buffer). A parameter with one of them updates that buffer at the mean momentum
    (m_t + m_d) / 2; a distillation-only parameter then adds wd p to g_d. A buffer's first update copies its
    gradient, as torch SGD does (task: with wd; distillation-only: without, as the reference clones before adding wd).
    State per parameter: "task_buffer", "distill_buffer" (each absent until first used).
    """

    def __init__(self, params: Any, lr: float, task_momentum: float, distill_momentum: float,
                 weight_decay: float = 0.0) -> None:
        for name, value in (("task_momentum", task_momentum), ("distill_momentum", distill_momentum)):
            if not 0 <= value < 1:
                raise ValueError(f"DOT: {name} must be in [0, 1), got {value}")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"DOT: lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        defaults = dict(lr=lr, task_momentum=task_momentum, distill_momentum=distill_momentum,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.distill_grads: list[Tensor | None] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the task gradients and the handed-over distillation gradients."""
        super().zero_grad(set_to_none=set_to_none)
        self.distill_grads = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One DOT update of every parameter with a task or a distillation gradient; consumes `distill_grads`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distill = iter(self.distill_grads) if self.distill_grads is not None else None
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            m_task, m_distill = group["task_momentum"], group["distill_momentum"]
            m_mean = (m_task + m_distill) / 2
            for param in group["params"]:
                g_task = param.grad
                g_distill = next(distill) if distill is not None else None
                state = self.state[param]
                if g_task is not None:
                    d_p = g_task.add(param, alpha=decay) if decay != 0 else g_task
                    buffer = state.get("task_buffer")
                    if buffer is None:
                        buffer = state["task_buffer"] = torch.clone(d_p).detach()
                    else:
                        buffer.mul_(m_task if g_distill is not None else m_mean).add_(d_p)
                    param.add_(buffer, alpha=-lr)
                if g_distill is not None:
                    g_distill = g_distill.to(param.dtype)
                    buffer = state.get("distill_buffer")
                    if buffer is None:
                        buffer = state["distill_buffer"] = torch.clone(g_distill).detach()
                    elif g_task is not None:
                        buffer.mul_(m_distill).add_(g_distill)
                    else:
                        d_p = g_distill.add(param, alpha=decay) if decay != 0 else g_distill
                        buffer.mul_(m_mean).add_(d_p)
                    param.add_(buffer, alpha=-lr)
        self.distill_grads = None
        return loss


def dot_optimizer(delta: float) -> Callable[..., DOTOptimizer]:
    """The "optimizer" factory of a DOT group: SGD's arguments in, momenta optim.momentum -/+ delta."""

    def make(params: Any, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> DOTOptimizer:
        if nesterov:
            raise ValueError("components.dot: DOT has no Nesterov form (mdistiller's DistillationOrientedTrainer "
                             "is plain momentum SGD); set optim.nesterov=false")
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(f"components.dot.delta: DOT's momenta optim.momentum -/+ delta must lie in [0, 1), got "
                             f"{momentum} -/+ {delta} = {momentum - delta:g} and {momentum + delta:g}; lower "
                             "components.dot.delta (0.075 with momentum 0.9 is the reference's)")
        return DOTOptimizer(params, lr=lr, task_momentum=momentum - delta, distill_momentum=momentum + delta,
                            weight_decay=weight_decay)

    return make


@register_component("dot")
class DOT(Component):
    """The "main" group's SGD becomes DOTOptimizer; the strategy's step hands it the two gradients apart."""

    name: ClassVar[str] = "dot"
    option_class: ClassVar[type] = DOTOptions
    splits_gradients: ClassVar[bool] = True

    def attach(self, strategy: Any) -> None:
        """Refuse several ranks (the two-gradient step is not verified under DDP)."""
        if is_distributed():
            raise ValueError("dot is not supported with several ranks yet: its two backward passes per step are not "
                             "verified under DDP (mdistiller runs it under DP; its issue #52); run it in one process")

    def optimizer_group(self, group: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The student's group ("main") gets DOT's optimiser; the others (SAKD's agent) stay plain SGD."""
        if group != "main":
            return spec
        return {**spec, "optimizer": dot_optimizer(self.options.delta)}


__all__ = ["DOT", "DOTOptimizer", "DOTOptions", "dot_optimizer"]
