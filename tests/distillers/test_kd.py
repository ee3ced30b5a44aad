"""KD: the formula on hand-sized tensors, masks, gradients."""
from __future__ import annotations

import math

import torch

from adakd.distillers import available, get
from adakd.distillers.kd import KDConfig, kd_loss


def test_kd_by_hand_on_two_by_three_logits():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    expected = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        ps, pt = softmax(s), softmax(t)
        expected.append(temperature**2 * sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    got = kd_loss(student, teacher, temperature)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert got[1].abs() < 1e-7  # identical distributions give zero


def test_kd_module_masks_and_registry():
    assert "kd" in available()
    kd = get("kd")(["logits"], [(5,)], [(5,)], KDConfig(temperature=4.0))
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5)
    plain = kd([student], [teacher], torch.zeros(6, dtype=torch.long))["kd/logits"]
    ones = kd([student], [teacher], torch.zeros(6, dtype=torch.long), masks=[torch.ones(6)])["kd/logits"]
    assert torch.equal(plain, ones)
    assert torch.allclose(plain, kd_loss(student, teacher, 4.0).mean())
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    masked = kd([student], [teacher], torch.zeros(6, dtype=torch.long), masks=[mask])["kd/logits"]
    masked.backward()
    assert torch.all(student.grad[mask == 0] == 0) and torch.all(student.grad[mask == 1].abs().sum(1) > 0)
    # The masked loss is a mean over the whole batch with zeros for masked-out samples.
    assert torch.allclose(masked, (kd_loss(student, teacher, 4.0) * mask).sum() / 6)


def test_kd_gradient_matches_finite_differences():
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, 3.0).double(), (student,))
