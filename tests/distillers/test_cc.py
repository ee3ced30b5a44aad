"""CC: the consecutive-pair correlation by hand, embedding heads, sub-batch masking, real zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch

from adakd.distillers.cc import CC, CCConfig, cc_loss
from distiller_checks import (PAIRS, assert_zoo_state_dict_round_trip, check_all_ones_mask, check_degenerate_selections,
                              check_gradient, check_sub_batch_mask, one_spot, zoo_pair)

# reference/model-zoo.md §6: both Linear(d -> 128) heads with bias, keyed (teacher, student).
EMBED_PARAMS = {("wrn_40_2", "wrn_16_2"): 33_024, ("resnet32x4", "resnet8x4"): 65_792, ("vgg13", "vgg8"): 131_328,
                ("vgg13", "MobileNetV2"): 229_632, ("ResNet50", "MobileNetV2"): 426_240,
                ("resnet32x4", "ShuffleV1"): 155_904}


def test_cc_by_hand_on_three_embeddings():
    student = [[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]
    teacher = [[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]]
    delta = [[abs(a - b) for a, b in zip(s, t)] for s, t in zip(student, teacher)]
    # Pairs (0, 1) and (1, 2): 1·2 + 1·2 = 4 and 2·2 + 2·0.5 = 5.
    expected = sum(sum(x * y for x, y in zip(delta[i], delta[i + 1])) for i in range(2)) / 2
    got = cc_loss(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64))
    assert expected == 4.5 and math.isclose(got.item(), expected, rel_tol=1e-15)


def test_cc_gradient_matches_finite_differences():
    check_gradient(cc_loss, (5, 4), (5, 4))


def test_cc_module_embeds_and_masks_a_sub_batch():
    cc = CC(["pooled"], [(5,)], [(3,)], CCConfig(embed_dim=4)).double()
    student = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    plain = check_all_ones_mask(cc, "cc/pooled", student, teacher)
    direct = cc_loss(student @ cc.embed_s[0].weight.t() + cc.embed_s[0].bias,
                     teacher @ cc.embed_t[0].weight.t() + cc.embed_t[0].bias)
    assert torch.allclose(plain, direct)
    mask = torch.tensor([0.0, 1, 0, 1, 1, 0])
    check_sub_batch_mask(cc, "cc/pooled", student, teacher, mask, lambda s, t: one_spot(cc, "cc/pooled", s, t))
    assert all(p.grad is not None for p in cc.trainable_parameters())  # both heads learn by default
    check_degenerate_selections(cc, "cc/pooled", student, teacher, gradient_may_be_none=False)
    assert cc_loss(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.0  # an unmasked batch of one has no pair


def test_cc_frozen_teacher_embedding():
    cc = CC(["pooled"], [(5,)], [(3,)], CCConfig(teacher_embed_trainable=False))
    assert {id(p) for p in cc.trainable_parameters()} == {id(p) for p in cc.embed_s.parameters()}
    teacher = torch.randn(4, 3, requires_grad=True)
    cc([torch.randn(4, 5)], [teacher], torch.zeros(4, dtype=torch.long))["cc/pooled"].backward()
    assert teacher.grad is None and all(p.grad is None for p in cc.embed_t.parameters())
    assert all(p.grad is not None for p in cc.embed_s.parameters())
    # The frozen embedding stays a constant even to a teacher that is trained jointly (detach_teacher off).
    cc.detach_teacher = False
    cc([torch.randn(4, 5)], [teacher], torch.zeros(4, dtype=torch.long))["cc/pooled"].backward()
    assert teacher.grad is None


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cc_on_zoo_pairs(teacher_name, student_name):
    pair = zoo_pair("cc", teacher_name, student_name)
    distiller, out = pair.distiller, pair.out
    assert distiller.defaults.method_weight == 0.02 and distiller.defaults.spots == (-2,)
    assert sum(p.numel() for p in distiller.parameters()) == EMBED_PARAMS[(teacher_name, student_name)]
    assert list(out) == ["cc/pooled"] and torch.isfinite(out["cc/pooled"])
    assert_zoo_state_dict_round_trip("cc", pair)
