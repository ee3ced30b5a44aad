"""AT: the attention map and loss by hand, pooling, masks, gradients, zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

import adakd.distillers as D
from adakd.distillers.at import AT, at_loss, attention_map
from distiller_checks import PAIRS, check_gradient, check_two_spatial_spots, check_zoo_stage_terms


def energy_map(sample):
    """Normalised channel energy of one [C][H][W] nested list, flattened row-major."""
    c, h, w = len(sample), len(sample[0]), len(sample[0][0])
    energy = [sum(sample[k][i][j] ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(e * e for e in energy))
    return [e / norm for e in energy]


def test_attention_map_is_normalised_channel_energy():
    feat = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, -1.0]]]], dtype=torch.float64)
    # channel means of squares: (1+9)/2, (4+0)/2, (0+1)/2, (1+1)/2 = 5, 2, 0.5, 1
    expected = torch.tensor([5.0, 2.0, 0.5, 1.0], dtype=torch.float64) / math.sqrt(25 + 4 + 0.25 + 1)
    assert torch.allclose(attention_map(feat, 2), expected[None], atol=1e-15)


def test_at_loss_by_hand_with_pooling():
    torch.manual_seed(1)
    student = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    teacher = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    pooled = student.reshape(3, 2, 2, 2, 2, 2).mean((3, 5))  # 2x2 average pooling, written as a reshape
    got = at_loss(student, teacher)
    for b in range(3):
        a_s, a_t = energy_map(pooled[b].tolist()), energy_map(teacher[b].tolist())
        assert math.isclose(got[b].item(), sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 4, rel_tol=1e-12)
    assert torch.allclose(at_loss(teacher, student), got)  # the pooling goes to whichever map is larger


def test_at_batch_mean_equals_the_crd_benchmark_mean():
    student, teacher = torch.randn(5, 3, 4, 4), torch.randn(5, 6, 4, 4)

    def reference_map(f):
        energy = (f * f).sum(1).flatten(1)
        return energy / energy.norm(dim=1, keepdim=True)

    assert torch.allclose(at_loss(student, teacher).mean(), ((reference_map(student) - reference_map(teacher)) ** 2)
                          .mean())


def test_at_gradient_matches_finite_differences():
    check_gradient(at_loss, (3, 2, 4, 4), (3, 3, 2, 2))


def test_at_module_masks_and_teacher():
    check_two_spatial_spots(AT, at_loss, ones_masks=[torch.ones(6), None], checked=1)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_at_on_zoo_pairs(teacher_name, student_name):
    defaults = D.DistillerDefaults(ce_weight=1.0, method_weight=1000.0, spots=("stages",))
    check_zoo_stage_terms("at", teacher_name, student_name, defaults)
