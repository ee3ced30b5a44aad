"""FT: the factor loss by hand, paraphraser/translator layout and sizes, pre-training, masks, zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adakd.distillers as D
from adakd.distillers.ft import FT, FTConfig, ft_loss
from distiller_checks import (assert_gradients_follow_mask, check_all_ones_mask, check_gradient,
                              check_state_dict_round_trip, one_spot, zoo_pair)

# FT paraphraser / translator sizes of reference/model-zoo.md §6 (teacher, student) -> parameters.
HEAD_SIZES = {("wrn_40_2", "wrn_16_2"): (516_672, 258_816), ("resnet32x4", "resnet8x4"): (2_065_536, 1_033_728),
              ("vgg13", "vgg8"): (8_259_840, 4_131_840), ("vgg13", "MobileNetV2"): (8_259_840, 1_190_880),
              ("ResNet50", "MobileNetV2"): (132_129_792, 11_148_768),
              ("resnet32x4", "ShuffleV1"): (2_065_536, 9_551_424)}


def test_ft_loss_by_hand_with_pooling():
    student = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]]]], dtype=torch.float64)            # 1 channel, 2x2
    teacher = torch.tensor([[[[1.0, 2.0]], [[1.0, 0.0]]]], dtype=torch.float64)          # 2 channels, 1x2
    # student pooled to 1x2: [1.5, 0.5] -> squares [2.25, 0.25]; teacher channel means of squares [1, 2]
    phi_s = [2.25 / math.hypot(2.25, 0.25), 0.25 / math.hypot(2.25, 0.25)]
    phi_t = [1 / math.sqrt(5), 2 / math.sqrt(5)]
    expected = (abs(phi_s[0] - phi_t[0]) + abs(phi_s[1] - phi_t[1])) / 2
    assert math.isclose(ft_loss(student, teacher).item(), expected, rel_tol=1e-12)
    a, b = torch.randn(5, 3, 4, 4), torch.randn(5, 2, 4, 4)

    def factor(f):  # the CRD benchmark's factor, written with a norm
        energy = f.pow(2).mean(1).flatten(1)
        return energy / energy.norm(dim=1, keepdim=True)

    assert torch.allclose(ft_loss(a, b).mean(), (factor(a) - factor(b)).abs().mean())


def test_ft_gradient_matches_finite_differences():
    check_gradient(ft_loss, (3, 2, 2, 2), (3, 3, 2, 2))


def layer_kinds(module):
    return [(type(m).__name__, getattr(m, "in_channels", None), getattr(m, "out_channels", None))
            for m in module if not isinstance(m, nn.Identity)]


def test_ft_paraphraser_and_translator_layout():
    ft = FT(["stage3"], [(6, 4, 4)], [(8, 2, 2)])
    paraphraser, translator = ft.paraphrasers[0], ft.translators[0]
    leaky = ("LeakyReLU", None, None)
    assert layer_kinds(paraphraser.encoder) == [("Conv2d", 8, 8), leaky, ("Conv2d", 8, 4), leaky, ("Conv2d", 4, 4),
                                                leaky]
    assert layer_kinds(paraphraser.decoder) == [("ConvTranspose2d", 4, 4), leaky, ("ConvTranspose2d", 4, 8), leaky,
                                                ("ConvTranspose2d", 8, 8), leaky]
    bn = [("BatchNorm2d", None, None)]
    assert layer_kinds(translator) == [("Conv2d", 6, 6), *bn, leaky, ("Conv2d", 6, 4), *bn, leaky, ("Conv2d", 4, 4),
                                       *bn, leaky]
    convs = [m for m in [*paraphraser.modules(), *translator.modules()] if isinstance(m, nn.modules.conv._ConvNd)]
    assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1) for m in convs)
    assert all(m.negative_slope == 0.1 for m in translator.modules() if isinstance(m, nn.LeakyReLU))
    with pytest.raises(ValueError, match="spatial maps"):
        FT(["pooled"], [(8,)], [(8,)])


def test_ft_pretraining_hook():
    ft = FT(["stage3"], [(3, 4, 4)], [(4, 4, 4)], FTConfig(pretrain_epochs=30, pretrain_lr=0.01))
    assert ft.pretrain_epochs == 30 and ft.pretrain_lr == 0.01
    para = {id(p) for p in ft.paraphrasers.parameters()}
    assert {id(p) for p in ft.pretrain_parameters()} == para
    assert {id(p) for p in ft.trainable_parameters()} == {id(p) for p in ft.translators.parameters()}
    teacher = torch.rand(8, 4, 4, 4)
    loss = ft.pretrain_loss([teacher])
    assert torch.allclose(loss, ((ft.paraphrasers[0](teacher) - teacher) ** 2).mean())
    optimiser = torch.optim.SGD(ft.pretrain_parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        optimiser.zero_grad(set_to_none=True)
        ft.pretrain_loss([teacher]).backward()
        optimiser.step()
    assert ft.pretrain_loss([teacher]) < loss
    assert all(p.grad is None for p in ft.translators.parameters())


def test_ft_module_masks_frozen_paraphraser_and_teacher():
    ft = FT(["stage3"], [(3, 4, 4)], [(4, 2, 2)]).double().eval()
    student = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    plain = check_all_ones_mask(ft, "ft/stage3", student, teacher)
    expected = ft_loss(ft.translators[0](student), ft.paraphrasers[0].encoder(teacher)).mean()
    assert torch.allclose(plain, expected)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    one_spot(ft, "ft/stage3", student, teacher, masks=[mask]).backward()
    # Eval mode: in train mode the translator's BatchNorm couples samples through batch statistics (as in [R]).
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None
    assert all(p.grad is None for p in ft.pretrain_parameters())
    assert all(p.grad is not None for p in ft.trainable_parameters())
    assert one_spot(ft, "ft/stage3", student, teacher, masks=[torch.zeros(6)]).item() == 0.0


def test_ft_empty_selection_zero_or_unmasked():
    # specs/sakd.md §8.4: no selected sample gives exactly 0 (default) or the full-batch unmasked loss ([C] train.py).
    student = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    zero, unmasked = (FT(["stage3"], [(3, 4, 4)], [(4, 2, 2)], FTConfig(empty_selection=rule)).double().eval()
                      for rule in ("zero", "unmasked"))
    unmasked.load_state_dict(zero.state_dict())
    full = one_spot(zero, "ft/stage3", student, teacher)
    assert full > 0
    assert one_spot(zero, "ft/stage3", student, teacher, masks=[torch.zeros(6)]).item() == 0.0
    empty = one_spot(unmasked, "ft/stage3", student, teacher, masks=[torch.zeros(6)])
    assert torch.equal(empty, full)
    (grad_empty,) = torch.autograd.grad(empty, student)
    (grad_full,) = torch.autograd.grad(full, student)
    assert torch.equal(grad_empty, grad_full) and (grad_full.flatten(1).abs().sum(1) > 0).all()
    # A non-empty selection is the masked mean under both rules, bit for bit.
    assert torch.equal(one_spot(unmasked, "ft/stage3", student, teacher, masks=[mask]),
                       one_spot(zero, "ft/stage3", student, teacher, masks=[mask]))
    with pytest.raises(ValueError, match="empty_selection"):
        FTConfig(empty_selection="skip")


def test_ft_state_dict_round_trip():
    first = FT(["stage3"], [(3, 4, 4)], [(4, 4, 4)])
    second = FT(["stage3"], [(3, 4, 4)], [(4, 4, 4)])
    _, teacher = check_state_dict_round_trip(first, second, "ft/stage3", (3, 4, 4), (4, 4, 4))
    assert torch.equal(first.pretrain_loss([teacher]), second.pretrain_loss([teacher]))


@pytest.mark.parametrize("teacher_name,student_name", list(HEAD_SIZES))
def test_ft_on_zoo_pairs_with_reference_head_sizes(teacher_name, student_name):
    pair = zoo_pair("ft", teacher_name, student_name)
    distiller, student_spots = pair.distiller, pair.student_spots
    assert distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=200.0, spots=(-3,))
    assert student_spots == [pair.student.num_stages - 3] and pair.teacher_spots == [pair.teacher.num_stages - 3]
    sizes = tuple(sum(p.numel() for p in part.parameters()) for part in (distiller.paraphrasers, distiller.translators))
    assert sizes == HEAD_SIZES[(teacher_name, student_name)]
    assert list(pair.out) == [f"ft/stage{student_spots[0]}"] and torch.isfinite(pair.out[next(iter(pair.out))])
