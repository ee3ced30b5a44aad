"""SP: the Gram-matrix formula by hand, sub-batch masking, gradients, real zoo pairs."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.sp import SP, sp_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """A staged zoo model and its features on a fixed batch of 4, built once per test file."""
    model = M.staged(M.create(name))
    with torch.no_grad():
        features = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features
    return model, features


def by_hand(student, teacher):
    def gram(rows):
        g = [[sum(a * b for a, b in zip(u, v)) for v in rows] for u in rows]
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in g]

    gs, gt = gram(student), gram(teacher)
    b = len(student)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_by_hand_on_three_two_channel_maps():
    student = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]], [[[3.0, 0.5]], [[1.0, 1.0]]], [[[-2.0, 1.0]], [[0.5, 0.0]]]],
                           dtype=torch.float64)
    teacher = torch.tensor([[[[0.0, 1.0]], [[2.0, 1.0]]], [[[1.0, -1.0]], [[1.0, 3.0]]], [[[2.0, 2.0]], [[-1.0, 0.0]]]],
                           dtype=torch.float64)
    expected = by_hand(student.flatten(1).tolist(), teacher.flatten(1).tolist())
    assert math.isclose(sp_loss(student, teacher).item(), expected, rel_tol=1e-12)
    assert sp_loss(teacher, teacher).item() == 0.0
    # Scaling a sample's features leaves its normalised similarity row unchanged.
    assert torch.allclose(sp_loss(student * 7.0, teacher), sp_loss(student, teacher))


def test_sp_gradient_matches_finite_differences():
    student = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: sp_loss(s, teacher), (student,))


def test_sp_stays_in_float32_under_autocast():
    student, teacher = torch.randn(5, 8, 2, 2), torch.randn(5, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sp_loss(student, teacher)
    assert torch.equal(under_autocast, sp_loss(student, teacher))

def test_sp_masks_select_a_sub_batch():
    sp = SP(["stage3"], [(3, 2, 2)], [(5, 2, 2)])
    student = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long)
    plain = sp([student], [teacher], targets)["sp/stage3"]
    assert torch.equal(plain, sp([student], [teacher], targets, masks=[torch.ones(6)])["sp/stage3"])
    assert torch.equal(plain, sp_loss(student, teacher))
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0])
    masked = sp([student], [teacher], targets, masks=[mask])["sp/stage3"]
    keep = mask.bool()
    assert torch.allclose(masked, sp_loss(student[keep], teacher[keep]) * 3 / 6)
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~keep] == 0)
    for selected in (0, 1):
        student.grad = None
        few = torch.zeros(6)
        few[:selected] = 1
        zero = sp([student], [teacher], targets, masks=[few])["sp/stage3"]
        zero.backward()
        assert zero.item() == 0.0 and (student.grad is None or torch.all(student.grad == 0))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_sp_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("sp", student, teacher, (3, 32, 32))
    assert distiller.defaults.method_weight == 3000.0 and distiller.defaults.spots == (-3,)
    assert student_spots == [student.num_stages - 3] and not distiller.state_dict()
    out = distiller([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    assert list(out) == [f"sp/stage{student.num_stages - 3}"] and torch.isfinite(out[next(iter(out))])
