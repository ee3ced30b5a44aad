"""PKT: the cosine-affinity KL by hand, sub-batch masking, gradients, real zoo pairs."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.pkt import PKT, pkt_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
EPS = 1e-7


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """A staged zoo model and its features on a fixed batch of 4, built once per test file."""
    model = M.staged(M.create(name))
    with torch.no_grad():
        features = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features
    return model, features


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
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, teacher), (student,))


def test_pkt_stays_in_float32_under_autocast():
    student, teacher = torch.randn(5, 16), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pkt_loss(student, teacher)
    assert torch.equal(under_autocast, pkt_loss(student, teacher))

def test_pkt_masks_select_a_sub_batch():
    pkt = PKT(["pooled"], [(5,)], [(3,)])
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long)
    plain = pkt([student], [teacher], targets)["pkt/pooled"]
    assert torch.equal(plain, pkt([student], [teacher], targets, masks=[torch.ones(6)])["pkt/pooled"])
    assert torch.equal(plain, pkt_loss(student, teacher))
    mask = torch.tensor([0.0, 1, 1, 0, 1, 1])
    masked = pkt([student], [teacher], targets, masks=[mask])["pkt/pooled"]
    keep = mask.bool()
    assert torch.allclose(masked, pkt_loss(student[keep], teacher[keep]) * 4 / 6)
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~keep] == 0)
    for selected in (0, 1):
        student.grad = None
        few = torch.zeros(6)
        few[:selected] = 1
        zero = pkt([student], [teacher], targets, masks=[few])["pkt/pooled"]
        zero.backward()
        assert zero.item() == 0.0 and (student.grad is None or torch.all(student.grad == 0))


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_pkt_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("pkt", student, teacher, (3, 32, 32))
    assert distiller.defaults.method_weight == 30000.0 and distiller.defaults.spots == (-2,)
    assert not distiller.state_dict()
    out = distiller([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    assert list(out) == ["pkt/pooled"] and torch.isfinite(out["pkt/pooled"])
