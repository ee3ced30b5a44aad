"""RKD: distance and angle terms by hand, the zero-distance guard, sub-batch masking, real zoo pairs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from adakd.distillers.rkd import RKD, RKDConfig, rkd_loss
from distiller_checks import (PAIRS, check_float32_under_autocast, check_gradient, check_relational_masking,
                              check_zoo_parameter_free_term)



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
    check_gradient(rkd_loss, (4, 5), (4, 3))


def test_rkd_single_sample_batch_gives_a_finite_zero():
    student = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    loss = rkd_loss(student, torch.randn(1, 3, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student.grad == 0)


def test_rkd_stays_in_float32_under_autocast():
    check_float32_under_autocast(rkd_loss, (5, 16), (5, 8))


def test_rkd_masks_select_a_sub_batch():
    rkd = RKD(["pooled"], [(5,)], [(3,)], RKDConfig())
    check_relational_masking(rkd, "rkd/pooled", rkd_loss, (5,), (3,), torch.tensor([1.0, 1, 0, 0, 1, 0]))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_rkd_on_zoo_pairs(teacher_name, student_name):
    pair = check_zoo_parameter_free_term("rkd", teacher_name, student_name, method_weight=1.0, spots=(-2,))
    assert list(pair.out) == ["rkd/pooled"]
