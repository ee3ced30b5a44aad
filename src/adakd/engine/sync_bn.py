"""Batch normalisation whose batch statistics span every rank, on CPU (gloo) as on CUDA.

PyTorch's nn.SyncBatchNorm refuses CPU tensors, so a gloo run would normalise each rank's half batch with its own
statistics and drift away from a one-process run with the same global batch. `SyncBatchNorm` here all-reduces the
per-channel sum, centred sum of squares and count in the forward pass and the per-channel sums of grad and
grad * x_hat in the backward pass, so outputs, input gradients and running statistics equal those of one
nn.BatchNorm over the concatenated batch. `convert_sync_batchnorm` swaps it in (torch's own on CUDA).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from adakd.models.staged import StagedModel
from adakd.ranks import world_size


def _all_reduce(tensor: Tensor, group: Any) -> Tensor:
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of every rank's batch; returns (y, mean, biased var, count)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                group: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Normalise `x` (N, C, ...) with the mean and variance of all ranks' batches."""
        dims = [0, *range(2, x.dim())]
        # Statistics in at least float32: a half-precision sum over a batch loses the digits the variance needs.
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        channels = x.shape[1]
        local_count = work.numel() // channels if channels else 0
        # One reduce carries the sums and the count; a second the squares centred on the global mean, because
        # E[x^2] - E[x]^2 cancels badly in float32 and would break agreement with nn.BatchNorm.
        packed = torch.cat([work.sum(dims), work.new_full((1,), float(local_count))])
        _all_reduce(packed, group)
        count = packed[-1]
        if count.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        shape = [1, channels] + [1] * (x.dim() - 2)
        mean = packed[:-1] / count
        centred = work - mean.view(shape)
        var = _all_reduce(centred.square().sum(dims), group) / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centred * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.view(shape).to(work.dtype)
        if bias is not None:
            y = y + bias.view(shape).to(work.dtype)
        ctx.save_for_backward(x_hat, invstd, weight, count)
        ctx.group, ctx.has_weight, ctx.has_bias = group, weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_unused: Tensor):
        """Input gradient of the loss summed over ranks; weight and bias gradients of this rank's share."""
        x_hat, invstd, weight, count = ctx.saved_tensors
        dims = [0, *range(2, x_hat.dim())]
        shape = [1, x_hat.shape[1]] + [1] * (x_hat.dim() - 2)
        grad = grad_y.to(x_hat.dtype)
        sum_dy = grad.sum(dims)
        sum_dy_xhat = (grad * x_hat).sum(dims)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # x moves the shared mean and variance, so every rank's grad reaches it: the sums must be global.
            # Weight and bias keep the local sums; DDP's averaging over ranks then yields the one-process gradient.
            packed = _all_reduce(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            mean_dy, mean_dy_xhat = (packed / count).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
            grad_x = (grad - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) * scale.view(shape)
            grad_x = grad_x.to(grad_y.dtype)
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else grad_y.dtype)
        return grad_x, grad_weight, grad_bias, None, None


class SyncBatchNorm(_BatchNorm):
    """nn.BatchNorm whose training statistics cover every rank of `process_group`; alone or in eval mode it is
    exactly nn.BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Batch norm with statistics all-reduced across ranks while training."""
        self._check_input_dim(input)
        # The same bookkeeping as nn.BatchNorm: momentum None means a cumulative average over batches.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats or world_size(self.process_group) == 1:
            running = not self.training or self.track_running_stats
            return F.batch_norm(input, self.running_mean if running else None,
                                self.running_var if running else None, self.weight, self.bias, batch_stats,
                                factor, self.eps)
        y, mean, var, count = SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps,
                                                          self.process_group)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                # Running variance is unbiased over the global count, as nn.BatchNorm's is over its batch.
                unbiased = var * (count / (count - 1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, process_group: Any = None) -> "SyncBatchNorm":
        """A SyncBatchNorm sharing `bn`'s parameters and buffers (the same tensors, not copies)."""
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
        if bn.affine:
            sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        sync.training = bn.training
        if hasattr(bn, "qconfig"):
            sync.qconfig = bn.qconfig
        return sync


def _swap_cpu(module: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and not isinstance(module,
                                                                                            SyncBatchNorm):
        return SyncBatchNorm.from_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted = _swap_cpu(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _repoint(root: nn.Module, swapped: dict[int, nn.Module]) -> None:
    """Point containers the module tree does not register (a StagedModel's stage blocks) at the new layers."""
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is not None and id(child) in swapped:
                module._modules[name] = swapped[id(child)]
            elif child is not None:
                visit(child)

    for module in list(root.modules()):
        if isinstance(module, StagedModel):
            for stage in module.stages:
                stage.blocks = [swapped.get(id(block), block) for block in stage.blocks]
                for block in stage.blocks:
                    visit(block)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Swap every BatchNorm1d/2d/3d for a synchronised one keeping its parameters and buffers: torch's
    nn.SyncBatchNorm on CUDA, this module's SyncBatchNorm on CPU."""
    tensors = [*module.parameters(), *module.buffers()]
    on_cuda = any(t.is_cuda for t in tensors)
    names = {name: layer for name, layer in module.named_modules() if isinstance(layer, _BatchNorm)}
    if on_cuda:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    else:
        converted = _swap_cpu(module, process_group)
    new_layers = dict(converted.named_modules())
    # Layers are swapped by name in the registered tree; views that hold the old objects elsewhere are repointed.
    swapped = {id(old): new_layers[name] for name, old in names.items()
               if name in new_layers and new_layers[name] is not old}
    if swapped:
        _repoint(converted, swapped)
    return converted
