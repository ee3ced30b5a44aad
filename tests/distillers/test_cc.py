"""CC: the consecutive-pair correlation by hand, embedding heads, sub-batch masking, real zoo pairs."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.cc import CC, CCConfig, cc_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
# reference/model-zoo.md §6: both Linear(d -> 128) heads with bias, keyed (teacher, student).
EMBED_PARAMS = {("wrn_40_2", "wrn_16_2"): 33_024, ("resnet32x4", "resnet8x4"): 65_792, ("vgg13", "vgg8"): 131_328,
                ("vgg13", "MobileNetV2"): 229_632, ("ResNet50", "MobileNetV2"): 426_240,
                ("resnet32x4", "ShuffleV1"): 155_904}


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """A staged zoo model and its features on a fixed batch of 4, built once per test file."""
    model = M.staged(M.create(name))
    with torch.no_grad():
        features = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features
    return model, features


def test_cc_by_hand_on_three_embeddings():
    student = [[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]
    teacher = [[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]]
    delta = [[abs(a - b) for a, b in zip(s, t)] for s, t in zip(student, teacher)]
    # Pairs (0, 1) and (1, 2): 1·2 + 1·2 = 4 and 2·2 + 2·0.5 = 5.
    expected = sum(sum(x * y for x, y in zip(delta[i], delta[i + 1])) for i in range(2)) / 2
    got = cc_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64))
    assert expected == 4.5 and math.isclose(got.item(), expected, rel_tol=1e-15)


def test_cc_gradient_matches_finite_differences():
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: cc_loss(s, teacher), (student,))


def test_cc_module_embeds_and_masks_a_sub_batch():
    cc = CC(["pooled"], [(5,)], [(3,)], CCConfig(embed_dim=4)).double()
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(6, dtype=torch.long)
    plain = cc([student], [teacher], targets)["cc/pooled"]
    assert torch.equal(plain, cc([student], [teacher], targets, masks=[torch.ones(6)])["cc/pooled"])
    direct = cc_loss(student @ cc.embed_s[0].weight.t() + cc.embed_s[0].bias,
                     teacher @ cc.embed_t[0].weight.t() + cc.embed_t[0].bias)
    assert torch.allclose(plain, direct)
    mask = torch.tensor([0.0, 1, 0, 1, 1, 0])
    keep = mask.bool()
    masked = cc([student], [teacher], targets, masks=[mask])["cc/pooled"]
    assert torch.allclose(masked, cc([student[keep]], [teacher[keep]], targets[keep])["cc/pooled"] * 3 / 6)
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~keep] == 0)
    assert all(p.grad is not None for p in cc.trainable_parameters())  # both heads learn by default
    for selected in (0, 1):
        student.grad = None
        few = torch.zeros(6)
        few[:selected] = 1
        zero = cc([student], [teacher], targets, masks=[few])["cc/pooled"]
        zero.backward()
        assert zero.item() == 0.0 and torch.all(student.grad == 0)
    assert cc_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.0  # an unmasked batch of one has no pair


def test_cc_frozen_teacher_embedding():
    cc = CC(["pooled"], [(5,)], [(3,)], CCConfig(teacher_embed_trainable=False))
    assert {id(p) for p in cc.trainable_parameters()} == {id(p) for p in cc.embed_s.parameters()}
    teacher = torch.randn(4, 3, requires_grad=True)
    cc([torch.randn(4, 5)], [teacher], torch.zeros(4, dtype=torch.long))["cc/pooled"].backward()
    assert teacher.grad is None and all(p.grad is None for p in cc.embed_t.parameters())
    assert all(p.grad is not None for p in cc.embed_s.parameters())


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cc_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("cc", student, teacher, (3, 32, 32))
    assert distiller.defaults.method_weight == 0.02 and distiller.defaults.spots == (-2,)
    assert sum(p.numel() for p in distiller.parameters()) == EMBED_PARAMS[(teacher_name, student_name)]
    inputs = ([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    out = distiller(*inputs)
    assert list(out) == ["cc/pooled"] and torch.isfinite(out["cc/pooled"])
    restored, _, _ = D.create("cc", student, teacher, (3, 32, 32))
    restored.load_state_dict(distiller.state_dict())
    assert torch.equal(restored(*inputs)["cc/pooled"], out["cc/pooled"])
