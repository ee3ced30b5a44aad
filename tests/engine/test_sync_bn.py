"""adakd's CPU SyncBatchNorm: alone it is nn.BatchNorm; over two gloo ranks, nn.BatchNorm on the whole batch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adakd import models
from adakd.engine.sync_bn import SyncBatchNorm, SyncBatchNormFunction, convert_sync_batchnorm


def reference(x: torch.Tensor, grad: torch.Tensor, bn: nn.BatchNorm2d):
    """nn.BatchNorm2d's output and gradients for upstream gradient `grad`."""
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(grad)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad


def test_function_alone_matches_batchnorm_in_float64():
    x = torch.randn(6, 4, 5, 3, dtype=torch.float64) * 3 + 1
    grad = torch.randn_like(x)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    y_ref, gx_ref, gw_ref, gb_ref = reference(x, grad, bn)

    xs = x.clone().requires_grad_(True)
    weight = bn.weight.detach().clone().requires_grad_(True)
    bias = bn.bias.detach().clone().requires_grad_(True)
    y, mean, var, count = SyncBatchNormFunction.apply(xs, weight, bias, bn.eps, None)
    y.backward(grad)
    assert count.item() == 6 * 5 * 3
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=0, atol=1e-12)
    for ours, theirs in [(y, y_ref), (xs.grad, gx_ref), (weight.grad, gw_ref), (bias.grad, gb_ref)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_function_gradcheck():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: SyncBatchNormFunction.apply(*a, 1e-5, None)[0], (x, weight, bias))


def test_function_without_affine():
    x = torch.randn(8, 3, 4, dtype=torch.float64, requires_grad=True)
    y, *_ = SyncBatchNormFunction.apply(x, None, None, 1e-5, None)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.batch_norm(x_ref, None, None, training=True)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_alone_is_batchnorm_running_stats_and_eval(momentum):
    bn = nn.BatchNorm2d(5, momentum=momentum)
    sync = SyncBatchNorm.from_batchnorm(copy.deepcopy(bn))
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 2 + 0.5
        torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)
    assert int(sync.num_batches_tracked) == 3
    torch.testing.assert_close(sync.running_mean, bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, bn.running_var, rtol=0, atol=0)
    bn.eval()
    sync.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)


def test_convert_swaps_every_batchnorm_and_the_staged_views():
    student = models.staged(models.create("resnet8", num_classes=10))
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    weight = student.model.bn1.weight
    converted = convert_sync_batchnorm(student)
    assert converted is student
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert layers and all(isinstance(m, SyncBatchNorm) for m in layers)
    assert converted.model.bn1.weight is weight  # the same parameters, so an optimiser built earlier still holds
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # The stem's nn.Sequential(conv1, bn1, relu) lives outside the registered tree; it must run the new layer.
    for stage in converted.stages:
        for block in stage.blocks:
            assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in block.modules())
    assert converted.stages[0].blocks[0][1] is converted.model.bn1


def _two_rank_worker(rank: int, init: str, x: torch.Tensor, grad: torch.Tensor, state: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        results = {}
        for dtype in (torch.float64, torch.float32):
            bn = nn.BatchNorm2d(x.shape[1])
            bn.load_state_dict(state)
            sync = SyncBatchNorm.from_batchnorm(bn.to(dtype))
            half = x.shape[0] // 2
            steps = []
            for _ in range(2):  # two steps: the second normalises with running stats already moved once
                part = x[rank * half:(rank + 1) * half].to(dtype).requires_grad_(True)
                sync.zero_grad()
                y = sync(part)
                y.backward(grad[rank * half:(rank + 1) * half].to(dtype))
                steps.append({"y": y.detach(), "gx": part.grad, "gw": sync.weight.grad.clone(),
                              "gb": sync.bias.grad.clone()})
            sync.eval()
            results[str(dtype)] = {"steps": steps, "running_mean": sync.running_mean.clone(),
                                   "running_var": sync.running_var.clone(), "tracked": sync.num_batches_tracked,
                                   "eval": sync(x[:3].to(dtype)).detach()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes in a gloo group
def test_two_gloo_ranks_equal_one_batchnorm_on_the_whole_batch(tmp_path):
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1
    grad = torch.randn_like(x)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    state = copy.deepcopy(bn.state_dict())
    # A file:// rendezvous needs no port; gloo's own localhost sockets are opened in the children, in C++.
    mp.spawn(_two_rank_worker, args=(f"file://{tmp_path}/rendezvous", x, grad, state, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # float64 shows the algebra is exact (1e-6 absolute); float32 differs from one BatchNorm by summation order.
    for dtype, rtol in ((torch.float64, 0.0), (torch.float32, 1e-5)):
        ours = [r[str(dtype)] for r in ranks]
        ref = nn.BatchNorm2d(3).to(dtype)
        ref.load_state_dict(state)
        for step in range(2):
            ref.zero_grad()
            y_ref, gx_ref, gw_ref, gb_ref = reference(x.to(dtype), grad.to(dtype), ref)
            close = dict(rtol=rtol, atol=1e-6)
            torch.testing.assert_close(torch.cat([r["steps"][step]["y"] for r in ours]), y_ref, **close)
            torch.testing.assert_close(torch.cat([r["steps"][step]["gx"] for r in ours]), gx_ref, **close)
            # Each rank keeps its share of the weight gradient: DDP's average over ranks, times 2, is their sum.
            torch.testing.assert_close(ours[0]["steps"][step]["gw"] + ours[1]["steps"][step]["gw"], gw_ref, **close)
            torch.testing.assert_close(ours[0]["steps"][step]["gb"] + ours[1]["steps"][step]["gb"], gb_ref, **close)
        for r in ours:
            torch.testing.assert_close(r["running_mean"], ref.running_mean, rtol=rtol, atol=1e-6)
            torch.testing.assert_close(r["running_var"], ref.running_var, rtol=rtol, atol=1e-6)
            assert int(r["tracked"]) == 2
        ref.eval()
        torch.testing.assert_close(ours[0]["eval"], ref(x[:3].to(dtype)).detach(), rtol=rtol, atol=1e-6)
