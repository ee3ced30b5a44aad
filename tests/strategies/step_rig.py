"""One strategy on tiny random networks, for tests that drive `training_step` directly (no trainer, no data).

`from step_rig import build_strategy, random_batch` (pytest puts this folder on sys.path).
"""
from __future__ import annotations

from typing import Any

import torch

from adakd import distillers, models, strategies
from adakd.distillers.base import DistillContext
from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.strategies.base import LossWeights, Precision, Strategy

SIZE = 16
CLASSES = 10


def build_strategy(name: str, method: str, options: dict[str, Any], *, samples: int = 64,
                   distiller_args: dict[str, Any] | None = None, clip_grad_norm: float | None = None,
                   accumulate: int = 1) -> Strategy:
    """Strategy `name` over `method` for a resnet8 student under a resnet14 teacher (seeded), with its optimisers
    attached on CPU in float32; SAKD gets its extra KD term (kl 1.0)."""
    torch.manual_seed(0)
    student = models.staged(models.create("resnet8", num_classes=CLASSES))
    teacher = models.frozen(models.create("resnet14", num_classes=CLASSES))
    context = DistillContext(num_classes=CLASSES, train_targets=torch.arange(samples) % CLASSES)
    distiller, s_spots, t_spots = distillers.create(method, student, teacher, (3, SIZE, SIZE), context=context,
                                                    **(distiller_args or {}))
    weights = LossWeights(ce=1.0, method=type(distiller).defaults.method_weight, kl=1.0 if name == "sakd" else 0.0)
    strategy = strategies.get(name)(student, teacher, distiller, weights, s_spots, t_spots, **options)
    strategy.attach(build_optimizers(strategy.param_groups(), OptimConfig(), 0.05),
                    Precision(torch.device("cpu"), False), total_steps=100, clip_grad_norm=clip_grad_norm,
                    accumulate=accumulate)
    return strategy


def random_batch(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, targets, dataset indices) of `size` random samples drawn from 64, seeded."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, SIZE, SIZE, generator=generator)
    indices = torch.randperm(64, generator=generator)[:size]
    return images, indices % CLASSES, indices
