"""SP: the Gram-matrix formula by hand, sub-batch masking, gradients, real zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

from adakd.distillers.sp import SP, sp_loss
from distiller_checks import (PAIRS, check_float32_under_autocast, check_gradient, check_relational_masking,
                              check_zoo_parameter_free_term)



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
    check_gradient(sp_loss, (4, 3, 2, 2), (4, 3, 2, 2))


def test_sp_stays_in_float32_under_autocast():
    check_float32_under_autocast(sp_loss, (5, 8, 2, 2), (5, 4, 2, 2))


def test_sp_masks_select_a_sub_batch():
    sp = SP(["stage3"], [(3, 2, 2)], [(5, 2, 2)])
    check_relational_masking(sp, "sp/stage3", sp_loss, (3, 2, 2), (5, 2, 2), torch.tensor([1.0, 0, 1, 1, 0, 0]))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_sp_on_zoo_pairs(teacher_name, student_name):
    pair = check_zoo_parameter_free_term("sp", teacher_name, student_name, method_weight=3000.0, spots=(-3,))
    assert pair.student_spots == [pair.student.num_stages - 3]
    assert list(pair.out) == [f"sp/stage{pair.student.num_stages - 3}"]
