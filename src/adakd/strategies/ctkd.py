"""CTKD: Li, Li, Yang, Qi, Zhao, Zhang, Yang, Wang, Yang, "Curriculum Temperature for Knowledge Distillation"
(AAAI 2023), as an adaptive component: the distillation temperature is learned, adversarially, with the student.

Follows zhengli97/CTKD:
- `models/temp_global.py` (`Global_T`, `GradientReversalFunction`): one parameter theta, initialised to 1.0, passes
  a gradient reversal layer; T = t_start + t_end * sigmoid(theta) (`helper/loops.py` `train_distill`, defaults
  t_start 1, t_end 20, so T lies in (1, 21) and starts at 1 + 20 sigmoid(1) = 15.62).
- `helper/loops.py` `train_distill`: T (a tensor in the graph, T^2 included) replaces the KD term's temperature
  (and DKD's); theta is in `trainable_list`, i.e. the student's SGD with its lr schedule and weight decay.
- `train_student.py` `CosineDecay` / `LinearDecay`, called once per epoch with the 1-based epoch: with the scripts'
  `--decay_max 0 --decay_min -1` the signed multiplier goes 0 -> -1, so the reversal strength |lambda| rises
  0 -> lambda_max over `--decay_loops` epochs and then stays (cosine: |lambda(e)| = lambda_max (1 - cos(pi
  min(e, L) / L)) / 2; linear: lambda_max min(e, L - 1) / L, the reference's clamp at L - 1 kept). L is 10 in
  scripts/run_cifar_distill.sh and 5 in scripts/run_imagenet_distill.sh (`components.ctkd.ramp_epochs=5`).
  That is the paper's easy-to-hard curriculum: CTKD issue #24 reads the code as running |lambda| 1 -> 0, but
  `CosineDecay` returns its max (0) first and its min (-1) from epoch L on, and the LS repository's CTKD logs
  record -0.0245, -0.0955, ..., -1.0. `reverse: true` is the issue's reading (|lambda| falls lambda_max -> 0).

Mode "instance" (one temperature per sample): the authors' instance-wise module is not in their repository (the
README links it on cloud drives only) and its architecture is not published. adakd's instance module is its own
design following the README's per-sample loss (mean_i T_i^2 KL_i at T_i): a two-layer MLP on the detached
softmax of the student's and the teacher's logits, concatenated, giving one theta per sample, which then passes
the same reversal and squashing as the global theta; its last layer starts at weight 0 and bias 1, so every sample
starts at the global initial temperature.

Composes with `standard`, SAKD (the temperature inside SAKD's masked terms) and its fixed-mask ablations, and with
any distiller that has a temperature of its own (kd, dkd, nkd, wsld, dist: `Distiller.learned_temperature`) or a run
with the extra KD term (`distill.kl_weight`); with logit standardisation (`distill.args.standardize=true`) it is
CTKD+LS. Not defined with ABL (refused at build: see `Strategy.temperature_refusal`).
Under several ranks the temperature's gradient is averaged across ranks after each backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adakd.options import OptionsError
from adakd.ranks import average_gradients, is_distributed
from adakd.strategies.components import Component, register_component

MODES = ("global", "instance")
SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class CTKDOptions:
    """CTKD's options; defaults are the CIFAR-100 script's (scripts/run_cifar_distill.sh)."""

    mode: str = "global"
    """"global": one learned temperature; "instance": one per sample (adakd's module, see the module docstring)."""
    t_start: float = 1.0
    """T = t_start + t_end * sigmoid(theta): the lowest temperature."""
    t_end: float = 20.0
    """The span above t_start."""
    schedule: str = "cosine"
    """How |lambda| ramps up: "cosine" (`CosineDecay`, the scripts') or "linear" (`LinearDecay`)."""
    ramp_epochs: int = 10
    """Epochs until |lambda| reaches lambda_max (`--decay_loops`: 10 on CIFAR-100, 5 on ImageNet)."""
    lambda_max: float = 1.0
    """The reversal strength after the ramp (the scripts' -decay_min)."""
    reverse: bool = False
    """True: |lambda| falls lambda_max -> 0 instead (CTKD issue #24's reading of the code; hard to easy)."""
    hidden: int = 128
    """Instance mode: width of the MLP's hidden layer."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionsError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise OptionsError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.ramp_epochs < 1:
            raise OptionsError("ramp_epochs", f"must be >= 1 (epochs until |lambda| reaches lambda_max), got "
                                              f"{self.ramp_epochs}")
        if self.lambda_max < 0:
            raise OptionsError("lambda_max", f"is a reversal strength and must be >= 0, got {self.lambda_max}")
        if self.t_start <= 0:
            raise OptionsError("t_start", f"is the lowest temperature and must be > 0, got {self.t_start}")
        if self.t_end < 0:
            raise OptionsError("t_end", f"is the temperature's span above t_start and must be >= 0, got {self.t_end}")
        if self.hidden < 1:
            raise OptionsError("hidden", f"must be >= 1, got {self.hidden}")


def reversal_strength(epoch: int, options: CTKDOptions) -> float:
    """|lambda| of a 1-based epoch: the reference's `CosineDecay`/`LinearDecay` magnitude, or its reverse."""
    ramp = options.ramp_epochs
    if options.schedule == "cosine":
        share = (1.0 - math.cos(math.pi * min(max(epoch, 0), ramp) / ramp)) / 2.0
    else:  # LinearDecay clamps its epoch at L - 1, so it tops out at (L - 1) / L
        share = min(max(epoch, 0), ramp - 1) / ramp
    return options.lambda_max * ((1.0 - share) if options.reverse else share)


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -strength (Ganin and Lempitsky 2015), so what follows
    is ascended: CTKD's `GradientReversalFunction` with its signed lambda = -strength."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * (-ctx.strength), None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """`x` forward; its gradient times -strength backward."""
    return GradientReversal.apply(x, strength)


class GlobalTemperature(nn.Module):
    """One learned theta (`Global_T`, initialised to 1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(()))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.theta


class InstanceTemperature(nn.Module):
    """One theta per sample from the detached softmax of both logit sets (adakd's design, not the authors')."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)  # every sample starts at the global theta, 1.0
        nn.init.ones_(self.mlp[2].bias)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        with torch.autocast(student_logits.device.type, enabled=False):  # a temperature in float32 under AMP
            inputs = torch.cat([F.softmax(student_logits.detach().float(), dim=1),
                                F.softmax(teacher_logits.detach().float(), dim=1)], dim=1)
            return self.mlp(inputs).squeeze(1)


@register_component("ctkd")
class CTKD(Component):
    """The learned curriculum temperature: T = t_start + t_end * sigmoid(GRL(theta)), theta ascending the KD loss."""

    name: ClassVar[str] = "ctkd"
    option_class: ClassVar[type | None] = CTKDOptions
    changes_temperature: ClassVar[bool] = True

    def __init__(self, options: CTKDOptions | None = None, facts: Any = None) -> None:
        super().__init__(options if options is not None else CTKDOptions(), facts)
        self.strength = reversal_strength(0, self.options)  # before the first begin_epoch: the ramp's start
        self.module: nn.Module | None = None
        self.last: Tensor | None = None

    def attach(self, strategy: Any) -> None:
        """Own the temperature module in the student's optimiser group; refuse where no term takes a temperature."""
        if strategy.teacher is None:
            raise ValueError("ctkd needs a teacher to distil from; run it with task=distill or drop components.ctkd")
        distiller = strategy.distiller
        if not (distiller is not None and distiller.learned_temperature) and strategy.weights.kl <= 0:
            method = distiller.name if distiller is not None else "the run"
            raise ValueError(f"ctkd: {method} has no temperature to learn; add an extra KD term with "
                             "distill.kl_weight=0.9, or use a distiller with one (kd, dkd, nkd, wsld, dist)")
        if self.options.mode == "instance":
            if self.facts is None:
                raise ValueError("ctkd: mode=instance needs the number of classes (the run's facts)")
            self.module = InstanceTemperature(self.facts.num_classes, self.options.hidden)
        else:
            self.module = GlobalTemperature()
        strategy.own("ctkd", self.module, "main")
        if is_distributed():  # the module is outside DDP: every rank must learn the same temperature
            for param in self.module.parameters():
                param.register_post_accumulate_grad_hook(lambda p: average_gradients([p]))

    def begin_epoch(self, epoch: int) -> None:
        """Move |lambda| along its schedule (the reference's once-per-epoch `get_value(epoch)`)."""
        self.strength = reversal_strength(epoch, self.options)

    def temperature(self, base: float, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The learned temperature of this step (`base` unused): a scalar, or [B] in instance mode."""
        theta = self.module(student_logits, teacher_logits)
        learned = self.options.t_start + self.options.t_end * torch.sigmoid(reverse_gradient(theta, self.strength))
        self.last = learned.detach()
        return learned

    def metrics(self) -> dict[str, Tensor]:
        """train/temperature: the step's temperature (its mean over samples in instance mode)."""
        return {} if self.last is None else {"temperature": self.last.mean()}
