"""Where this process sits among the ranks of a `torchrun` job, and the collectives every room shares.

A ground-floor module: every room may import it and it imports no room. Every helper is a no-op (or answers as a
single process) when no process group is up, so the same code runs alone, under gloo and under NCCL.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def process_group_up() -> bool:
    """True when torch.distributed is built in and a process group has been initialised (of any size)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Number of ranks in `group` (the default group when None); 1 without a process group."""
    return dist.get_world_size(group) if process_group_up() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without a process group."""
    return dist.get_rank() if process_group_up() else 0


def is_distributed() -> bool:
    """True when more than one rank takes part, so that collectives have work to do."""
    return world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks in place (no-op when alone); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _reduce_flat(tensors: list[Tensor], average: bool) -> None:
    # One flat buffer, so a step pays one collective's latency instead of one per tensor.
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if average:
        flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_across_ranks(tensors: list[Tensor]) -> None:
    """All-reduce sum of every tensor in place, through one flat buffer (no-op when alone)."""
    _reduce_flat(tensors, average=False)


def average_across_ranks(tensors: list[Tensor]) -> None:
    """All-reduce mean of every tensor in place (sum, then divide by the world size) through one flat buffer."""
    _reduce_flat(tensors, average=True)


def average_gradients(params: list[Tensor]) -> None:
    """Average the gradients of parameters no DDP wrapper synchronises (parameters without a gradient are skipped)."""
    average_across_ranks([p.grad for p in params if p.grad is not None])


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm statistics) to every rank, as DDP's broadcast_buffers does before a forward."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if is_distributed():
        dist.barrier()


__all__ = ["all_reduce_sum", "average_across_ranks", "average_gradients", "barrier", "broadcast_buffers",
           "is_distributed", "process_group_up", "rank", "sum_across_ranks", "world_size"]
