"""Optimisers and the multi-step learning-rate schedule (a pure function of the epoch)."""
from __future__ import annotations

from typing import Any

import torch

from adakd.engine.config import OptimConfig


def base_lr(config: OptimConfig, global_batch: int) -> float:
    """The configured lr, scaled linearly with the global batch when asked (lr is quoted for 256)."""
    return config.lr * global_batch / 256 if config.scale_lr_with_batch else config.lr


def lr_at(config: OptimConfig, epoch: int, lr: float) -> float:
    """lr for 1-based `epoch`: multiplied by lr_decay once the epoch exceeds each milestone."""
    passed = sum(1 for m in config.milestones if epoch > m)
    return lr * config.lr_decay**passed


class MultiStepSchedule:
    """Sets every optimiser's lr at the start of an epoch; its state is only the last epoch set."""

    def __init__(self, config: OptimConfig, optimizers: dict[str, torch.optim.Optimizer], lr: float) -> None:
        self.config, self.optimizers, self.lr = config, optimizers, lr
        self.epoch = 0

    def start_epoch(self, epoch: int) -> float:
        """Apply the lr of `epoch` (a group may carry an `lr_scale`: a strategy's own optimiser, e.g. a policy at half
        lr)."""
        self.epoch = epoch
        value = lr_at(self.config, epoch, self.lr)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = value * group.get("lr_scale", 1.0)
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "base_lr": self.lr, "milestones": list(self.config.milestones)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


def build_optimizers(
    groups: dict[str, Any], config: OptimConfig, lr: float
) -> dict[str, torch.optim.Optimizer]:
    """One SGD per parameter group a strategy declares (weight decay on every parameter, as the papers do).

    A group is a list of parameters, or a dict {"params": [...], "lr_scale": s, "weight_decay": wd} for an
    optimiser with its own settings (a strategy's own part, e.g. a policy at half the lr with weight decay 1e-3).
    `lr_scale` follows the schedule. A dict's "optimizer", a callable taking SGD's arguments, replaces SGD (an
    adaptive component's update rule, see Component.optimizer_group); its ValueError names the setting to change.
    """
    optimizers = {}
    for name, group in groups.items():
        spec = group if isinstance(group, dict) else {"params": group}
        params = list(spec["params"])
        if not params:
            raise ValueError(f"parameter group {name!r} is empty: nothing would be trained")
        scale = float(spec.get("lr_scale", 1.0))
        make = spec.get("optimizer", torch.optim.SGD)  # an adaptive component's own optimiser (Component hook)
        optimizer = make(
            params, lr=lr * scale, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=float(spec.get("weight_decay", config.weight_decay)),
        )
        for param_group in optimizer.param_groups:
            param_group["lr_scale"] = scale
        optimizers[name] = optimizer
    return optimizers
