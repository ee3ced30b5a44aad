"""The staged view: any zoo model as ordered stages and fine-grained blocks.

A family file describes its model with `@register_layout(ModelClass)`: a function returning the ordered
`Stage`s `[stem, stage1 .. stageN, pool, head]`, each a list of blocks that reuse the model's own modules. A model
without one (timm, torchvision, your own) is cut automatically from its traced forward (`auto_staged.py`).
The view never copies or renames parameters, so `model.state_dict()` keys are unchanged.

Feature indices (the "spots" of every distiller) are stage indices: f0 = stem output, f1..fN = stage
outputs, then the pooled vector and the logits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from adakd.models.auto_staged import AutoLayoutError, auto_stages
from adakd.models.stage_types import Stage, StagedOutput
from adakd.modes import eval_mode

_LAYOUTS: dict[type, Callable[[nn.Module], list[Stage]]] = {}


def register_layout(model_class: type) -> Callable:
    """Decorator registering the stage layout function of a model class."""

    def decorate(fn: Callable[[nn.Module], list[Stage]]) -> Callable[[nn.Module], list[Stage]]:
        if model_class in _LAYOUTS:
            raise ValueError(f"a stage layout for {model_class.__name__} is registered twice")
        _LAYOUTS[model_class] = fn
        return fn

    return decorate


def forward_with_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run one block and return (output, pre-activation output).

    A block that defines `forward_preact` supplies both; an `nn.Sequential` ending in a ReLU yields the
    tensor before that ReLU; any other block's output is already a pre-activation (MobileNetV2's linear
    bottlenecks, WRN's raw residual sums) and is returned twice.
    """
    if hasattr(block, "forward_preact"):
        return block.forward_preact(x)
    if isinstance(block, nn.Sequential) and len(block) and isinstance(block[-1], nn.ReLU):
        for module in block[:-1]:
            x = module(x)
        # An in-place ReLU would overwrite the pre-activation we hand out.
        return torch.relu(x), x
    out = block(x)
    return out, out


class StagedModel(nn.Module):
    """A model run stage by stage; `forward` returns every stage output from `start` to `end`.

    Wrap this module (not the bare model) in DDP so that feature-returning forwards still synchronise
    gradients. `self.model` is the original classifier; save and load `self.model.state_dict()`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        layout = _LAYOUTS.get(type(model))
        if layout is None:
            # timm / torchvision / user models: cut the traced forward (adakd/models/auto_staged.py).
            try:
                stages = auto_stages(model)
            except AutoLayoutError as err:
                raise AutoLayoutError(
                    f"{type(model).__name__} has no registered stage layout and cannot be staged automatically: {err}"
                ) from None
        else:
            stages = layout(model)
        self.model = model
        # A cut traced forward has no pre-activation outputs: its `preacts` repeat the features.
        self.auto_cut = layout is None
        self.stages: list[Stage] = stages
        names = [s.name for s in self.stages]
        if names[0] != "stem" or names[-2:] != ["pool", "head"]:
            raise ValueError(f"a layout must run stem, stages..., pool, head; got {names}")

    @property
    def stage_names(self) -> list[str]:
        """Stage names in order: stem, stage1..stageN, pool, head."""
        return [s.name for s in self.stages]

    @property
    def num_stages(self) -> int:
        """Number of stages including stem, pool and head."""
        return len(self.stages)

    @property
    def has_layout(self) -> bool:
        """True for a model whose family file registers its layout (the zoo); False for one cut automatically."""
        return type(self.model) in _LAYOUTS

    def preact_batchnorms(self, indices: list[int], method: str) -> list[nn.Module]:
        """The BatchNorm before the last ReLU of each stage in `indices`; ValueError naming `method` where none is
        declared (automatically staged timm/torchvision models, ShuffleNets, pool and head)."""
        found = [self.stages[self._index(i)].preact_bn for i in indices]
        missing = [self.stages[self._index(i)].name for i, bn in zip(indices, found) if bn is None]
        if missing:
            raise ValueError(f"{method} reads the BatchNorm before the ReLU of each teacher spot, but "
                             f"{type(self.model).__name__} declares none at {', '.join(missing)} (only zoo ResNets, "
                             "WRNs, VGGs and MobileNetV2 and torchvision ResNets do); choose such a teacher or body-stage "
                             "spots (distill.spots)")
        return found

    def _index(self, i: int) -> int:
        return i % len(self.stages)

    def forward(self, x: Tensor, start: int = 0, end: int = -1, preact: bool = False) -> StagedOutput:
        """Run stages `start..end` (inclusive) on `x`, the input of stage `start`."""
        start, end = self._index(start), self._index(end)
        features, preacts = [], []
        for stage in self.stages[start : end + 1]:
            if preact and stage.has_preact:
                for block in stage.blocks[:-1]:
                    x = block(x)
                x, pre = forward_with_preact(stage.blocks[-1], x)
            else:
                for block in stage.blocks:
                    x = block(x)
                pre = x
            features.append(x)
            preacts.append(pre)
        return StagedOutput(features, preacts)

    def run(self, x: Tensor, start: int = 0, end: int = -1) -> Tensor:
        """Output of stage `end` given the input of stage `start`."""
        return self.forward(x, start, end).features[-1]

    @torch.no_grad()
    def feature_shapes(self, input_shape: tuple[int, int, int] = (3, 32, 32)) -> list[tuple[int, ...]]:
        """Per-stage output shapes (without batch), measured by one forward pass of a dummy input."""
        # Restore each module's own mode: a fresh view is in training mode whatever the model's mode is.
        with eval_mode(self):
            param = next(self.model.parameters())
            dummy = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
            return [tuple(f.shape[1:]) for f in self.forward(dummy).features]

    def blocks(self) -> list[nn.Sequential]:
        """ABL's fine-grained blocks: stem merged into block 1, pool and head into the last block."""
        body = self.stages[:-2]
        groups: list[list[nn.Module]] = []
        pending: list[nn.Module] = []
        for stage in body:
            if stage.merge_into_next_block:
                pending.extend(stage.blocks)
                continue
            for block in stage.blocks:
                groups.append(pending + [block])
                pending = []
        groups[-1].extend(pending + self.stages[-2].blocks + self.stages[-1].blocks)
        return [nn.Sequential(*g) for g in groups]

    def block_end_stages(self) -> list[int]:
        """For each ABL block, the index of the stage its output belongs to (last block: head)."""
        ends: list[int] = []
        for index, stage in enumerate(self.stages[:-2]):
            if not stage.merge_into_next_block:
                ends.extend([index] * len(stage.blocks))
        ends[-1] = len(self.stages) - 1
        return ends


def staged(model: nn.Module) -> StagedModel:
    """Build the staged view of a zoo model."""
    return StagedModel(model)


class Flatten(nn.Module):
    """Flatten all but the batch dimension, as the reference forwards do with `view`."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.size(0), -1)


class FrozenStagedModel(StagedModel):
    """A teacher: no parameter requires grad and the module stays in eval mode whatever `train()` asks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenStagedModel":
        """Ignore `mode`: BatchNorm must keep using the teacher's running statistics."""
        return super().train(False)

    def forward(self, x: Tensor, start: int = 0, end: int = -1, preact: bool = False) -> StagedOutput:
        with torch.no_grad():
            return super().forward(x, start, end, preact)


def frozen(model: nn.Module) -> FrozenStagedModel:
    """The frozen, eval-mode staged view used for teachers."""
    return FrozenStagedModel(model)
