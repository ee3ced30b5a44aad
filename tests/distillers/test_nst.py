"""NST: the polynomial-kernel MMD by hand, per-sample Gram matrices, masks, gradients, zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

import adakd.distillers as D
from adakd.distillers.nst import NST, nst_loss
from distiller_checks import PAIRS, check_gradient, check_two_spatial_spots, check_zoo_stage_terms


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
    check_gradient(nst_loss, (3, 2, 2, 2), (3, 4, 2, 2))


def test_nst_module_masks_and_teacher():
    check_two_spatial_spots(NST, nst_loss, ones_masks=[torch.ones(6), torch.ones(6)], checked=0)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_nst_on_zoo_pairs(teacher_name, student_name):
    defaults = D.DistillerDefaults(ce_weight=1.0, method_weight=50.0, spots=("stages",))
    check_zoo_stage_terms("nst", teacher_name, student_name, defaults)
