"""What every distiller shares: per-spot inputs, optional per-sample masks, named per-spot terms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DistillerDefaults:
    """Weights the field uses with a method when it runs alone (recipes.md §4)."""

    ce_weight: float = 1.0
    method_weight: float = 1.0
    spots: tuple[int, ...] = (-1,)  # stage indices of the staged view; -1 = logits, -2 = pooled vector


def masked_mean(per_sample: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the whole batch with masked-out samples contributing exactly zero."""
    if mask is None:
        return per_sample.mean()
    return (per_sample * mask.to(per_sample.dtype)).sum() / per_sample.shape[0]


class Distiller(nn.Module):
    """Base class: subclasses implement `forward` returning {"<name>/<spot>": scalar loss}.

    A distiller never runs the teacher, never picks spots or samples and never applies the CE/KD balance
    weights; its trainable parts (regressors, embeddings, memory banks) are submodules built from the
    measured feature shapes it is given.
    """

    name: str = "base"
    defaults = DistillerDefaults()

    def __init__(self, spot_names: Sequence[str]) -> None:
        super().__init__()
        self.spot_names = list(spot_names)

    def term_names(self) -> list[str]:
        """The metric names this distiller returns, one per spot."""
        return [f"{self.name}/{spot}" for spot in self.spot_names]

    def forward(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        targets: Tensor,
        masks: list[Tensor | None] | None = None,
        indices: Tensor | None = None,
        epoch: int = 1,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


def spot_name(stage_names: Sequence[str], index: int) -> str:
    """A readable name for a stage index: stem, stage2, pooled, logits."""
    name = stage_names[index]
    return {"pool": "pooled", "head": "logits"}.get(name, name)


def build_config(cls: type, args: dict[str, Any], where: str) -> Any:
    """Instantiate a distiller's hyper-parameter dataclass, rejecting unknown keys by name."""
    import dataclasses
    import difflib

    names = [f.name for f in dataclasses.fields(cls)]
    for key in args:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {where}.{close[0]}?" if close else f"; valid keys: {', '.join(names) or 'none'}"
            raise ValueError(f"unknown config key {where}.{key}{hint}")
    return cls(**args)


def zero_like_loss(reference: Tensor) -> Tensor:
    """A zero that keeps the autograd graph attached to `reference` (no NaN, no dropped graph)."""
    return reference.sum() * 0.0 if reference.requires_grad else torch.zeros((), device=reference.device)
