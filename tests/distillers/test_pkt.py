"""PKT: the cosine-affinity KL by hand, sub-batch masking, gradients, real zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

from adakd.distillers.pkt import PKT, pkt_loss
from distiller_checks import (PAIRS, check_float32_under_autocast, check_gradient, check_relational_masking,
                              check_zoo_parameter_free_term)

EPS = 1e-7


def by_hand(student, teacher):
    def probabilities(rows):
        units = [[x / (math.sqrt(sum(y * y for y in row)) + EPS) for x in row] for row in rows]
        affinity = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in units] for u in units]
        return [[x / sum(row) for x in row] for row in affinity]

    ps, pt = probabilities(student), probabilities(teacher)
    b = len(student)
    return sum(pt[i][j] * math.log((pt[i][j] + EPS) / (ps[i][j] + EPS)) for i in range(b) for j in range(b)) / b**2


def test_pkt_by_hand_on_three_vectors():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0], [2.0, 2.0, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.5, 0.0, 1.0, 1.0], [1.0, 1.0, -2.0, 0.0], [0.0, 3.0, 1.0, -1.0]], dtype=torch.float64)
    assert math.isclose(pkt_loss(student, teacher).item(), by_hand(student.tolist(), teacher.tolist()), rel_tol=1e-12)
    assert abs(pkt_loss(teacher, teacher).item()) < 1e-15
    assert pkt_loss(student, teacher).item() > 0  # a KL divergence between different row distributions


def test_pkt_gradient_matches_finite_differences():
    check_gradient(pkt_loss, (4, 5), (4, 3))


def test_pkt_stays_in_float32_under_autocast():
    check_float32_under_autocast(pkt_loss, (5, 16), (5, 8))


def test_pkt_masks_select_a_sub_batch():
    pkt = PKT(["pooled"], [(5,)], [(3,)])
    check_relational_masking(pkt, "pkt/pooled", pkt_loss, (5,), (3,), torch.tensor([0.0, 1, 1, 0, 1, 1]))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_pkt_on_zoo_pairs(teacher_name, student_name):
    pair = check_zoo_parameter_free_term("pkt", teacher_name, student_name, method_weight=30000.0, spots=(-2,))
    assert list(pair.out) == ["pkt/pooled"]
