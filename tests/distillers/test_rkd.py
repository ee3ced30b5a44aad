"""RKD: distance and angle terms by hand, the zero-distance guard, sub-batch masking, real zoo pairs."""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.rkd import RKD, RKDConfig, rkd_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """A staged zoo model and its features on a fixed batch of 4, built once per test file."""
    model = M.staged(M.create(name))
    with torch.no_grad():
        features = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features
    return model, features


def smooth_l1(a, b):
    gap = abs(a - b)
    return 0.5 * gap * gap if gap < 1 else gap - 0.5


def by_hand(student, teacher):
    """(distance term, angle term) with plain Python geometry."""
    b = len(student)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]

    def normalised_distances(rows):
        mean = sum(math.dist(rows[i], rows[j]) for i, j in pairs) / len(pairs)
        return {(i, j): math.dist(rows[i], rows[j]) / mean for i, j in pairs}

    ds, dt = normalised_distances(student), normalised_distances(teacher)
    distance = sum(smooth_l1(ds[p], dt[p]) for p in pairs) / b**2  # the zero diagonal agrees and adds nothing

    def cosine(rows, i, j, k):
        u = [a - c for a, c in zip(rows[j], rows[i])]
        v = [a - c for a, c in zip(rows[k], rows[i])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        return 0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv)

    triplets = list(itertools.product(range(b), repeat=3))
    angle = sum(smooth_l1(cosine(student, *t), cosine(teacher, *t)) for t in triplets) / len(triplets)
    return distance, angle


def test_rkd_by_hand_on_three_points():
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [-3.0, 0.5]], dtype=torch.float64)  # a near-straight angle
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 7.0]], dtype=torch.float64)
    distance, angle = by_hand(student.tolist(), teacher.tolist())
    assert distance > 0.01 and angle > 0.01  # the straight angle reaches smooth-L1's linear part
    assert math.isclose(rkd_loss(student, teacher).item(), 25 * distance + 50 * angle, rel_tol=1e-9)
    assert math.isclose(rkd_loss(student, teacher, 1.0, 0.0).item(), distance, rel_tol=1e-9)
    assert math.isclose(rkd_loss(student, teacher, 0.0, 1.0).item(), angle, rel_tol=1e-9)
    # Both terms are invariant to scaling and translating a whole batch.
    assert torch.allclose(rkd_loss(student * 5 + 2, teacher), rkd_loss(student, teacher))


def test_rkd_gradient_matches_finite_differences():
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, teacher), (student,))


def test_rkd_single_sample_batch_gives_a_finite_zero():
    student = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    loss = rkd_loss(student, torch.randn(1, 3, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student.grad == 0)


def test_rkd_stays_in_float32_under_autocast():
    student, teacher = torch.randn(5, 16), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = rkd_loss(student, teacher)
    assert torch.equal(under_autocast, rkd_loss(student, teacher))

def test_rkd_masks_select_a_sub_batch():
    rkd = RKD(["pooled"], [(5,)], [(3,)], RKDConfig())
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long)
    plain = rkd([student], [teacher], targets)["rkd/pooled"]
    assert torch.equal(plain, rkd([student], [teacher], targets, masks=[torch.ones(6)])["rkd/pooled"])
    assert torch.equal(plain, rkd_loss(student, teacher))
    mask = torch.tensor([1.0, 1, 0, 0, 1, 0])
    masked = rkd([student], [teacher], targets, masks=[mask])["rkd/pooled"]
    keep = mask.bool()
    assert torch.allclose(masked, rkd_loss(student[keep], teacher[keep]) * 3 / 6)
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~keep] == 0)
    for selected in (0, 1):
        student.grad = None
        few = torch.zeros(6)
        few[:selected] = 1
        zero = rkd([student], [teacher], targets, masks=[few])["rkd/pooled"]
        zero.backward()
        assert zero.item() == 0.0 and (student.grad is None or torch.all(student.grad == 0))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_rkd_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("rkd", student, teacher, (3, 32, 32))
    assert distiller.defaults.method_weight == 1.0 and distiller.defaults.spots == (-2,)
    assert not distiller.state_dict()
    out = distiller([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    assert list(out) == ["rkd/pooled"] and torch.isfinite(out["rkd/pooled"])
