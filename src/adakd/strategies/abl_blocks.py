"""ABL's block mechanics: the block partition, the block-by-block forward and the pieces its steps share.

Gradient routing is the spec's scheme A (specs/abl.md §3.2): one forward in which every block's input is a detached
leaf, so BatchNorm sees each batch once; the KD loss on detached copies of the spot tensors; the KD error carried
down block by block with input-only vector-Jacobian products; and the student parts of all blocks from one backward
call, which the leaves stop at every block boundary (and which skips each block's first input gradient).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from adakd.models.stage_types import StagedOutput
from adakd.models.staged import StagedModel, forward_with_preact
# Re-exported (listed in __all__): ABL's modules import them from here.
from adakd.numerics import cross_entropy_upcast
from adakd.ranks import average_across_ranks, broadcast_buffers


def block_plan(staged: StagedModel, group_by_stage: bool = False) -> list[list[tuple[int, nn.Module, bool]]]:
    """ABL blocks as lists of (stage index, module, ends its stage), in the partition of `StagedModel.blocks()`."""
    stages = staged.stages
    groups: list[list[tuple[int, nn.Module, bool]]] = []
    pending: list[tuple[int, nn.Module, bool]] = []
    for index, stage in enumerate(stages[:-2]):
        units = [(index, module, k == len(stage.blocks) - 1) for k, module in enumerate(stage.blocks)]
        if stage.merge_into_next_block:
            pending.extend(units)
        elif group_by_stage:
            groups.append(pending + units)
            pending = []
        else:
            for unit in units:
                groups.append(pending + [unit])
                pending = []
    tail = [(i, m, k == len(stages[i].blocks) - 1) for i in (len(stages) - 2, len(stages) - 1)
            for k, m in enumerate(stages[i].blocks)]
    groups[-1].extend(pending + tail)
    return groups


@dataclass
class BlockForward:
    """One forward of the student block by block: stage features, block inputs and outputs."""

    output: StagedOutput
    block_inputs: list[Tensor]
    block_outputs: list[Tensor]


def forward_blocks(staged: StagedModel, plan, x: Tensor, preact: bool, detach: bool = False, start: int = 0,
                   cached: StagedOutput | None = None) -> BlockForward:
    """Run blocks `start..L` on `x` (block `start`'s input); stages ending below `start` come from `cached`.

    With `detach`, every block after the first starts from a detached leaf copy of the previous output (§3.2), so
    an autograd call over one block's tensors never reaches below it.
    """
    stages = staged.stages
    features: list[Tensor | None] = list(cached.features) if cached is not None else [None] * len(stages)
    preacts: list[Tensor | None] = list(cached.preacts) if cached is not None else [None] * len(stages)
    inputs, outputs = [], []
    for l in range(start, len(plan)):
        if detach and l > 0:
            x = x.detach().requires_grad_(torch.is_grad_enabled())
        inputs.append(x)
        for stage_index, module, ends_stage in plan[l]:
            if ends_stage and preact and stages[stage_index].has_preact:
                x, pre = forward_with_preact(module, x)
            else:
                x = module(x)
                pre = x
            if ends_stage:
                features[stage_index], preacts[stage_index] = x, pre
        outputs.append(x)
    return BlockForward(StagedOutput(features, preacts), inputs, outputs)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float | Tensor) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def sgd_next(param: Tensor, grad: Tensor, group: dict, state: dict) -> tuple[Tensor, float]:
    """(w', dw'/dg) of one `torch.optim.SGD` step from `grad`, without touching the optimiser (§6.3 step 2)."""
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    step = grad + group["weight_decay"] * param if group["weight_decay"] else grad
    jacobian = 1.0
    if momentum:
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = step
        else:
            buffer = momentum * buffer + (1 - dampening) * step
            jacobian = 1 - dampening
        if group["nesterov"]:
            step = step + momentum * buffer
            jacobian = 1 + momentum * jacobian
        else:
            step = buffer
    if group.get("maximize"):
        raise ValueError("ABL's virtual step does not support SGD(maximize=True)")
    return param - lr * step, lr * jacobian


@contextlib.contextmanager
def preserved(modules: list[nn.Module], params: list[Tensor] | None = None) -> Iterator[None]:
    """Restore the BatchNorm statistics inside `modules` and `params` bit for bit on exit.

    Only BatchNorm buffers: CRD's memory banks keep the rows a validation forward writes (the validation samples'
    own rows, which the training split reads only as negatives), so validation positives are real embeddings.
    """
    buffers = [b for m in modules for sub in m.modules() if isinstance(sub, nn.modules.batchnorm._BatchNorm)
               for b in sub.buffers()]
    saved_buffers = [b.clone() for b in buffers]
    params = params or []
    saved_params = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
            for p, s in zip(params, saved_params):
                p.copy_(s)


@dataclass
class Components:
    """The per-block gradient parts of §1 at the current weights, and the loss values (detached)."""

    a: list[list[Tensor | None]]  # alpha * local student error, per block, per parameter
    b: list[list[Tensor | None]]  # beta * teacher error (ordinary backprop of beta * K)
    c: list[list[Tensor | None]]  # auxiliary heads (unweighted local CE), per non-last block
    e: list[Tensor | None]  # distiller heads
    terms: dict[str, Tensor]
    logits: Tensor
    forward: BlockForward
    teacher_out: StagedOutput
    batch: tuple[Tensor, Tensor, int]  # targets, indices and epoch of the training batch (for §6.6)


__all__ = ["BlockForward", "Components", "ScaleGrad", "average_across_ranks", "block_plan", "broadcast_buffers",
           "cross_entropy_upcast", "forward_blocks", "preserved", "sgd_next"]
