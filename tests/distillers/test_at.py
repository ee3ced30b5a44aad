"""AT: the attention map and loss by hand, pooling, masks, gradients, zoo pairs."""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.at import AT, at_loss, attention_map

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]


@lru_cache(maxsize=None)
def zoo_model(name: str):
    torch.manual_seed(0)
    net = M.staged(M.create(name)).eval()
    with torch.no_grad():
        return net, net(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features


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
    student = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: at_loss(s, teacher), (student,))


def test_at_module_masks_and_teacher():
    at = AT(["stage1", "stage2"], [(2, 4, 4), (3, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    student = [torch.randn(6, 2, 4, 4, requires_grad=True), torch.randn(6, 3, 2, 2, requires_grad=True)]
    teacher = [torch.randn(6, 4, 4, 4, requires_grad=True), torch.randn(6, 6, 2, 2, requires_grad=True)]
    targets = torch.zeros(6, dtype=torch.long)
    plain = at(student, teacher, targets)
    assert list(plain) == ["at/stage1", "at/stage2"]
    ones = at(student, teacher, targets, masks=[torch.ones(6), None])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masks = [torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([0.0, 1, 1, 1, 0, 0])]
    masked = at(student, teacher, targets, masks=masks)
    assert torch.allclose(masked["at/stage2"], (at_loss(student[1], teacher[1]) * masks[1]).sum() / 6)
    sum(masked.values()).backward()
    for feat, mask in zip(student, masks):
        assert torch.all(feat.grad[mask == 0] == 0) and torch.all(feat.grad[mask == 1].abs().sum((1, 2, 3)) > 0)
    assert all(t.grad is None for t in teacher)
    assert not at.state_dict()
    with pytest.raises(ValueError, match="spatial maps"):
        AT(["pooled"], [(8,)], [(8,)])


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_at_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("at", student, teacher, (3, 32, 32))
    assert distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=1000.0, spots=("stages",))
    assert student_spots == teacher_spots == list(range(1, student.num_stages - 2))
    out = distiller([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    assert list(out) == [f"at/stage{k}" for k in student_spots]
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
