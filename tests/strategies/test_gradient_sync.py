"""Issue 20: under DDP, gradient accumulation all-reduces once per optimiser step (`Strategy.gradient_sync`).

The loop runs every micro-batch but a step's last inside DDP's `no_sync`, forward and backward (DDP decides at the
forward whether the backward all-reduces). A stub with DDP's `no_sync` shows where the context is entered; a real
DDP wrapper on a one-rank gloo group shows the all-reduces that remain: one per optimiser step.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from adakd.engine.loop import train_one_epoch
from step_rig import SIZE, build_strategy, random_batch


class CountingWrapper(nn.Module):
    """A DDP-like wrapper: forwards to `module`, and records whether each forward ran inside its `no_sync`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.syncing = True
        self.forwards_syncing: list[bool] = []
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, *args, **kwargs):
        self.forwards_syncing.append(self.syncing)
        return self.module(*args, **kwargs)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [random_batch(seed, size=4) for seed in range(count)]


@pytest.mark.parametrize("name", ["standard", "sakd"])
def test_no_sync_holds_exactly_the_micro_batches_before_a_steps_last(name: str) -> None:
    options = {"input_size": SIZE} if name == "sakd" else {}
    strategy = build_strategy(name, "kd", options, accumulate=3)
    wrapper = strategy.student = CountingWrapper(strategy.student)
    # 7 micro-batches at accumulate=3: steps end after the 3rd, the 6th and the 7th (the epoch's end).
    train_one_epoch(strategy, batches(7), epoch=1, progress=False)
    per_micro_batch = [i not in (0, 1, 3, 4) for i in range(7)]
    assert wrapper.entered == 4
    # Every forward of the student through the wrapper ran in its micro-batch's mode (SAKD may forward it more than
    # once per step; each of those forwards is inside or outside no_sync with its micro-batch).
    forwards_per_step = len(wrapper.forwards_syncing) // 7
    assert forwards_per_step >= 1 and len(wrapper.forwards_syncing) == 7 * forwards_per_step
    assert wrapper.forwards_syncing == [s for s in per_micro_batch for _ in range(forwards_per_step)]


def test_without_accumulation_no_sync_is_never_entered() -> None:
    strategy = build_strategy("standard", "kd", {}, accumulate=1)
    wrapper = strategy.student = CountingWrapper(strategy.student)
    train_one_epoch(strategy, batches(3), epoch=1, progress=False)
    assert wrapper.entered == 0 and wrapper.forwards_syncing == [True] * 3


def test_the_distillers_ddp_wrapper_skips_its_all_reduce_too() -> None:
    strategy = build_strategy("standard", "crd", {}, accumulate=2, distiller_args={"num_negatives": 16})
    student = strategy.student = CountingWrapper(strategy.student)
    heads = strategy.distiller_forward = CountingWrapper(strategy.distiller_forward)
    train_one_epoch(strategy, batches(4), epoch=1, progress=False)
    assert student.entered == heads.entered == 2
    assert heads.forwards_syncing == [False, True, False, True]


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, so a real DistributedDataParallel can be built inside the test process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_real_ddp_all_reduces_once_per_optimizer_step(one_rank_group) -> None:
    strategy = build_strategy("standard", "kd", {}, accumulate=2)
    ddp = strategy.student = nn.parallel.DistributedDataParallel(strategy.student)
    all_reduces = []

    def counting_hook(state, bucket):  # one process: the bucket's mean over ranks is the bucket itself
        all_reduces.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, counting_hook)
    # 5 micro-batches at accumulate=2: steps after the 2nd, the 4th and the 5th; one bucket (resnet8 is small).
    train_one_epoch(strategy, batches(5), epoch=1, progress=False)
    assert all_reduces == [0, 0, 0]
