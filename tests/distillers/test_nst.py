"""NST: the polynomial-kernel MMD by hand, per-sample Gram matrices, masks, gradients, zoo pairs."""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.nst import NST, nst_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]


@lru_cache(maxsize=None)
def zoo_model(name: str):
    torch.manual_seed(0)
    net = M.staged(M.create(name)).eval()
    with torch.no_grad():
        return net, net(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features


def mmd_by_hand(student, teacher):
    """Squared polynomial-kernel MMD of one sample, given its channels as lists of positions."""
    def unit(rows):
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in rows]

    def mean_kernel(a, b):
        return sum(sum(x * y for x, y in zip(u, v)) ** 2 for u in a for v in b) / (len(a) * len(b))

    s, t = unit(student), unit(teacher)
    return mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)


def test_nst_by_hand_per_sample():
    torch.manual_seed(2)
    student = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    teacher = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    got = nst_loss(student, teacher)
    assert got.shape == (3,)
    for b in range(3):
        expected = mmd_by_hand(student[b].flatten(1).tolist(), teacher[b].flatten(1).tolist())
        assert math.isclose(got[b].item(), expected, rel_tol=1e-12)
    assert torch.allclose(nst_loss(teacher, teacher), torch.zeros(3, dtype=torch.float64), atol=1e-14)
    # Each channel is normalised, so scaling a channel changes nothing.
    scaled = student.clone()
    scaled[:, 1] *= 5.0
    assert torch.allclose(nst_loss(scaled, teacher), got)


def test_nst_batch_mean_equals_the_crd_benchmark_form_and_pools():
    student, teacher = torch.randn(4, 3, 4, 4), torch.randn(4, 5, 2, 2)
    s = torch.nn.functional.avg_pool2d(student, 2).flatten(2)
    t = teacher.flatten(2)
    s, t = s / s.norm(dim=2, keepdim=True), t / t.norm(dim=2, keepdim=True)

    def kernel(a, b):  # [B, Cb, Ca]: every channel pair inside each sample, by broadcasting
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    reference = kernel(t, t).mean() + kernel(s, s).mean() - 2 * kernel(s, t).mean()
    assert torch.allclose(nst_loss(student, teacher).mean(), reference, atol=1e-6)


def test_nst_gradient_matches_finite_differences():
    student = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: nst_loss(s, teacher), (student,))


def test_nst_module_masks_and_teacher():
    nst = NST(["stage1", "stage2"], [(2, 4, 4), (3, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    student = [torch.randn(6, 2, 4, 4, requires_grad=True), torch.randn(6, 3, 2, 2, requires_grad=True)]
    teacher = [torch.randn(6, 4, 4, 4, requires_grad=True), torch.randn(6, 6, 2, 2, requires_grad=True)]
    targets = torch.zeros(6, dtype=torch.long)
    plain = nst(student, teacher, targets)
    assert list(plain) == ["nst/stage1", "nst/stage2"]
    ones = nst(student, teacher, targets, masks=[torch.ones(6), torch.ones(6)])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masks = [torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([0.0, 1, 1, 1, 0, 0])]
    masked = nst(student, teacher, targets, masks=masks)
    assert torch.allclose(masked["nst/stage1"], (nst_loss(student[0], teacher[0]) * masks[0]).sum() / 6)
    sum(masked.values()).backward()
    for feat, mask in zip(student, masks):
        assert torch.all(feat.grad[mask == 0] == 0) and torch.all(feat.grad[mask == 1].abs().sum((1, 2, 3)) > 0)
    assert all(t.grad is None for t in teacher)
    assert not nst.state_dict()
    with pytest.raises(ValueError, match="spatial maps"):
        NST(["pooled"], [(8,)], [(8,)])


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_nst_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("nst", student, teacher, (3, 32, 32))
    assert distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=50.0, spots=("stages",))
    assert student_spots == teacher_spots == list(range(1, student.num_stages - 2))
    out = distiller([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    assert list(out) == [f"nst/stage{k}" for k in student_spots]
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
