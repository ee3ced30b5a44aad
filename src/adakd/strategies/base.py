"""What every strategy shares: the models it drives, loss weights, optimisers and mixed precision."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from adakd.distillers.base import Distiller
from adakd.models.stage_types import StagedOutput
from adakd.models.staged import StagedModel
from adakd.ranks import average_gradients


@dataclass(frozen=True)
class LossWeights:
    """total = ce * CE + kl * KL_T + method * (each distiller term)."""

    ce: float = 1.0
    method: float = 0.0
    kl: float = 0.0
    temperature: float = 4.0


class Precision:
    """Autocast and gradient scaling on CUDA; plain float32 (no-ops) elsewhere."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.device_type = device.type
        # bfloat16 needs no loss scaling; float16 on GPUs without bf16 support does.
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward passes."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: Tensor, inputs: list[Tensor] | None = None) -> None:
        """Backward through the (possibly scaled) loss, into `inputs` only when given."""
        self.scaler.scale(loss).backward(inputs=inputs)

    def gradient_scale(self) -> float:
        """The factor a scaled backward multiplies gradients by (1.0 without float16 loss scaling)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def step(self, optimizer: torch.optim.Optimizer, update: bool = True, clip_grad_norm: float | None = None) -> None:
        """Optimiser step (skipped by the scaler on inf/NaN gradients), then the scale update.

        With `clip_grad_norm`, the gradients of `optimizer`'s parameters are first unscaled (so the norm is that of
        the true gradients) and clipped to that total 2-norm; the scaler remembers the unscale, so its step neither
        unscales twice nor misses an inf/NaN found there (the step is then skipped, as without clipping).
        A step with several optimisers passes `update=False` to all but the last, so the loss scale moves once
        per iteration.
        """
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        self.scaler.step(optimizer)
        if update:
            self.scaler.update()


class Strategy:
    """Owns the training step: forwards, masks and weights, backward, optimiser steps.

    The engine builds one optimiser per entry of `param_groups()` and hands them over with `attach`.
    Everything `training_step` returns is detached and stays on the device.

    Optional protocol (defaults below do nothing): `needs_validation` asks the engine to hold out
    `validation_fraction` of the training set and stream it through `attach_validation`; `max_steps` bounds the
    run in iterations and `should_stop` ends it early; `evaluate`, `drain_records` and `artifacts` add test
    metrics, per-step CSV rows and JSON files to the run directory.
    """

    needs_validation: bool = False
    max_steps: int | None = None

    def __init__(
        self,
        student: nn.Module,
        teacher: StagedModel | None,
        distiller: Distiller | None,
        weights: LossWeights,
        student_spots: list[int] | None = None,
        teacher_spots: list[int] | None = None,
        **options: Any,
    ) -> None:
        if options:
            raise ValueError(f"unknown strategy option(s) {sorted(options)} for {type(self).__name__}")
        self.student = student  # a StagedModel, or DDP around one
        self.teacher = teacher
        self.distiller = distiller
        # What the step calls: the distiller itself, or the engine's DDP wrapper around it.
        self.distiller_forward: nn.Module | None = distiller
        self.weights = weights
        self.student_spots = list(student_spots or [])
        self.teacher_spots = list(teacher_spots or self.student_spots)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.precision = Precision(torch.device("cpu"), enabled=False)
        self.total_steps = 1
        self.clip_grad_norm: float | None = None

    def param_groups(self) -> dict[str, Any]:
        """Trainable parameters per optimiser: the student and the distiller's parts share "main".

        A value is a list of parameters or {"params": [...], "lr_scale": s, "weight_decay": wd}.
        """
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.distiller is not None:
            params += [p for p in self.distiller.trainable_parameters() if p.requires_grad]
        return {"main": params}

    def attach(self, optimizers: dict[str, torch.optim.Optimizer], precision: Precision,
               total_steps: int = 1, clip_grad_norm: float | None = None) -> None:
        """Receive the optimisers built from `param_groups()`, the precision policy, the run's length in steps and
        the gradient-norm bound of every optimiser step (None: no clipping)."""
        self.optimizers = optimizers
        self.precision = precision
        self.total_steps = total_steps
        self.clip_grad_norm = clip_grad_norm

    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss: Tensor | None = None,
        *,
        grads: Iterable[tuple[Tensor, Tensor | None]] | None = None,
        inputs: list[Tensor] | None = None,
        unsynced: list[Tensor] | None = None,
        adjust: Callable[[], None] | None = None,
        update: bool = True,
    ) -> None:
        """The tail of every training step: zero_grad, gradients, rank averaging, optional clipping, step.

        The gradients come from a backward of `loss` through the precision's loss scaler (into `inputs` only when
        given), or are assigned from `grads` (parameter, gradient) pairs, multiplied by the loss scale so that they
        look like a scaled backward's. `unsynced` are parameters outside DDP whose gradients are averaged across
        ranks here; `adjust` then edits gradients in place before clipping (`self.clip_grad_norm`, unscaled first)
        and the step, which the scaler skips on inf/NaN. `update=False` leaves the loss scale for a later step.
        """
        optimizer.zero_grad(set_to_none=True)
        if grads is not None:
            grads = [(param, grad) for param, grad in grads if grad is not None]
            if grads and self.precision.scaler.is_enabled():
                # The scaler creates its scale tensor in scale(), which assigned gradients never pass through;
                # without it the step's unscale fails on the first iteration.
                self.precision.scaler.scale(torch.zeros((), device=grads[0][1].device))
            scale = self.precision.gradient_scale()
            for param, grad in grads:
                param.grad = (grad * scale if scale != 1.0 else grad).to(param.dtype)
        if loss is not None:
            self.precision.backward(loss, inputs=inputs)
        if unsynced:
            average_gradients(unsynced)
        if adjust is not None:
            adjust()
        self.precision.step(optimizer, update=update, clip_grad_norm=self.clip_grad_norm)

    def train(self, mode: bool = True) -> None:
        """Set train/eval mode of the trainable parts; the teacher stays in eval."""
        self.student.train(mode)
        if self.distiller is not None:
            self.distiller.train(mode)
        if self.teacher is not None:
            self.teacher.eval()

    def state_dict(self) -> dict[str, Any]:
        """Extra state to checkpoint (distiller parts); the student and optimisers are saved by the engine."""
        return {"distiller": self.distiller.state_dict() if self.distiller is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` strictly."""
        if self.distiller is not None:
            self.distiller.load_state_dict(state["distiller"], strict=True)
        elif state.get("distiller"):
            raise ValueError("checkpoint holds distiller state but this run has no distiller")

    def owned_modules(self) -> list[nn.Module]:
        """Trainable modules the strategy builds itself (heads, policy, adapters); the engine may convert their BN."""
        return []

    def evaluate(self, loader) -> dict[str, float]:
        """Extra test metrics (logged as test/<name>) beside the student's own accuracy."""
        return {}

    def drain_records(self) -> dict[str, list[dict[str, Any]]]:
        """Per-step rows logged since the last call, by CSV file name."""
        return {}

    def artifacts(self) -> dict[str, Any]:
        """JSON-serialisable objects to write as <name>.json after every epoch."""
        return {}

    def should_stop(self) -> bool:
        """True when the strategy has finished before the configured epochs."""
        return False

    def start_notices(self) -> list[tuple[str, bool]]:
        """(line, is_warning) pairs the engine prints and logs once when the run starts (e.g. how a search was sized)."""
        return []

    @staticmethod
    def select(output: StagedOutput, spots: list[int], preact: bool = False) -> list[Tensor]:
        """The features of one network at its spots."""
        source = output.preacts if preact else output.features
        return [source[k] for k in spots]

    def training_step(self, images: Tensor, targets: Tensor, indices: Tensor, epoch: int,
                      step: int = 0) -> dict[str, Tensor]:
        """One optimisation step (`step` is the 0-based global step); returns detached on-device scalars.

        Every value is a per-batch mean (the engine averages them weighted by batch size) except 'correct', a count.
        """
        raise NotImplementedError
