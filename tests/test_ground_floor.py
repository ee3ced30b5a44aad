"""Issue 20: the ground floor every room imports: adakd.ranks, adakd.modes.eval_mode, adakd.numerics."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from adakd import models, ranks
from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.modes import eval_mode
from adakd.numerics import at_least_float32, cross_entropy_upcast
from adakd.strategies.base import LossWeights, Precision
from adakd.strategies.standard import Standard


# ---- ranks: alone


def test_alone_every_helper_answers_as_one_process() -> None:
    assert not ranks.process_group_up() and not ranks.is_distributed()
    assert ranks.world_size() == 1 and ranks.rank() == 0
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ranks.average_across_ranks(tensors)
    ranks.sum_across_ranks(tensors)
    assert torch.equal(tensors[0], torch.tensor([1.0, 2.0])) and torch.equal(tensors[1], torch.tensor([[3.0]]))
    assert torch.equal(ranks.all_reduce_sum(torch.tensor([5.0])), torch.tensor([5.0]))
    ranks.broadcast_buffers(nn.BatchNorm1d(2))
    ranks.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        values = [torch.full((2, 3), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1))]
        params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
        params[0].grad = torch.full((3,), float(rank))  # params[1] has no gradient: skipped
        summed = [torch.tensor([float(rank)])]
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(rank))
        ranks.average_across_ranks(values)
        ranks.average_gradients(params)
        ranks.sum_across_ranks(summed)
        ranks.broadcast_buffers(bn)
        out[rank] = dict(world=ranks.world_size(), rank=ranks.rank(), distributed=ranks.is_distributed(),
                         values=values, grad=params[0].grad, no_grad=params[1].grad, summed=summed[0],
                         running_mean=bn.running_mean.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_average_sum_and_broadcast() -> None:
    """The flat-buffer mean equals the per-tensor sum divided by the world size; rank 0's buffers win."""
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world)
        results = dict(out)
    for rank, result in results.items():
        assert (result["world"], result["rank"], result["distributed"]) == (world, rank, True)
        assert torch.equal(result["values"][0], torch.full((2, 3), (1.0 + 2.0) / 2))
        assert torch.equal(result["values"][1], torch.full((4,), (10.0 + 20.0) / 2))
        assert torch.equal(result["grad"], torch.full((3,), (0.0 + 1.0) / 2))
        assert result["no_grad"] is None
        assert torch.equal(result["summed"], torch.tensor([1.0]))
        assert torch.equal(result["running_mean"], torch.zeros(3))


# ---- eval_mode


def _tree() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2)))
    model.train()
    model[2][1].eval()  # a child held in eval inside a training model (a frozen BN)
    return model


def _modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_eval_mode_sets_eval_and_restores_mixed_children() -> None:
    model = _tree()
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before  # the frozen BN stays in eval, the rest back in train


def test_eval_mode_nested_and_several_modules() -> None:
    a, b = _tree(), nn.Linear(1, 1).eval()
    before_a, before_b = _modes(a), _modes(b)
    with eval_mode(a, None, b):
        with eval_mode(a[2]):
            a[0].train()  # a change made inside the inner block is undone by the outer one
            assert not any(_modes(a[2]))
        assert _modes(a[2]) == [False] * 3 and a[0].training
    assert _modes(a) == before_a and _modes(b) == before_b


def test_eval_mode_restores_after_an_exception() -> None:
    model = _tree()
    before = _modes(model)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert _modes(model) == before


# ---- one CE upcast rule


@pytest.mark.parametrize("dtype, computed", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_cross_entropy_precision(dtype: torch.dtype, computed: torch.dtype) -> None:
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    targets = torch.tensor([0, 1, 2, 3])
    assert at_least_float32(logits).dtype == computed
    loss = cross_entropy_upcast(logits, targets)
    assert loss.dtype == computed
    assert torch.equal(loss, F.cross_entropy(logits.to(computed), targets))
    if dtype in (torch.float32, torch.float64):
        assert at_least_float32(logits) is logits  # no copy when nothing changes


def test_standard_step_keeps_a_float64_run_in_float64() -> None:
    """standard.py used `logits.float()`, which rounded a float64 run's CE down to float32."""
    torch.manual_seed(0)
    student = models.staged(models.create("resnet8", num_classes=10)).double()
    strategy = Standard(student, None, None, LossWeights(ce=1.0))
    strategy.attach(build_optimizers(strategy.param_groups(), OptimConfig(), 0.05),
                    Precision(torch.device("cpu"), False))
    strategy.train(True)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = F.cross_entropy(student(images).features[-1], targets)
    # The step's forward is in train mode: compare with a train-mode forward of the same weights.
    out = strategy.training_step(images, targets, torch.arange(4), epoch=1)
    assert out["ce"].dtype == torch.float64
    assert torch.equal(out["ce"], expected)
