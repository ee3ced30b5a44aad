"""Process-group set-up for `torchrun` (NCCL on CUDA, gloo on CPU) and rank-aware helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from adakd.ranks import all_reduce_sum, barrier, process_group_up

from .sync_bn import convert_sync_batchnorm


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' picks this rank's GPU when CUDA is present, else the CPU."""
    if preference == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        from adakd.engine.config import ConfigError  # late: config does not import the distributed layer

        raise ConfigError("device=cuda was requested but CUDA is not available; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(preference: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not process_group_up():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    """Leave the process group if one was joined."""
    if process_group_up():
        dist.destroy_process_group()


def wrap_student(module: nn.Module, info: DistInfo, sync_bn: bool = False,
                 broadcast_buffers: bool = True) -> nn.Module:
    """DDP around the trainable student only (the frozen teacher is never wrapped)."""
    if not info.distributed:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        # A frozen teacher has nothing to synchronise: DDP would refuse it and SyncBN would only add all-reduces.
        return module
    if sync_bn:
        # torch's SyncBatchNorm on CUDA; on CPU (gloo), where torch's refuses, adakd's own (engine/sync_bn.py).
        module = convert_sync_batchnorm(module)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# Re-exported: the engine's callers import the collectives from here as before.
__all__ = ["DistInfo", "all_reduce_sum", "barrier", "pick_device", "setup", "teardown", "unwrap", "wrap_student"]
