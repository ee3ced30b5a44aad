"""FitNets: the hint loss by hand, the ConvReg geometry, masks, gradients, zoo pairs and head sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adakd.distillers as D
from adakd.distillers.connectors import ConvReg
from adakd.distillers.fitnets import FitNets, fitnets_loss
from distiller_checks import (assert_gradients_follow_mask, check_all_ones_mask, check_gradient,
                              check_state_dict_round_trip, one_spot, zoo_pair)

# FitNet ConvReg sizes of reference/model-zoo.md §6 (teacher, student) -> parameters.
HEAD_SIZES = {("wrn_40_2", "wrn_16_2"): 4_288, ("resnet32x4", "resnet8x4"): 16_768, ("vgg13", "vgg8"): 66_304,
              ("vgg13", "MobileNetV2"): 4_864, ("ResNet50", "MobileNetV2"): 132_608,
              ("resnet32x4", "ShuffleV1"): 983_424}


def test_fitnets_loss_by_hand_and_equal_to_mse_mean():
    regressed = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[0.0, 0.0]], [[1.0, -1.0]]]], dtype=torch.float64)
    teacher = torch.tensor([[[[0.0, 2.0]], [[1.0, 4.0]]], [[[0.0, 3.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    # sample 0: squared errors 1, 0, 4, 0 -> 5/4; sample 1: 0, 9, 0, 4 -> 13/4
    assert torch.equal(fitnets_loss(regressed, teacher), torch.tensor([1.25, 3.25], dtype=torch.float64))
    a, b = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    assert torch.allclose(fitnets_loss(a, b).mean(), F.mse_loss(a, b))


def test_fitnets_gradient_matches_finite_differences():
    check_gradient(fitnets_loss, (3, 2, 2, 2), (3, 2, 2, 2))


@pytest.mark.parametrize("in_shape,out_shape,kind,kernel", [
    ((8, 16, 16), (6, 8, 8), nn.Conv2d, (3, 3)),            # twice as high: 3x3, stride 2
    ((8, 4, 4), (6, 8, 8), nn.ConvTranspose2d, (4, 4)),     # half as high: 4x4 transposed, stride 2
    ((8, 8, 8), (6, 8, 8), nn.Conv2d, (1, 1)),              # same size: 1x1
    ((8, 5, 5), (6, 3, 3), nn.Conv2d, (3, 3)),              # other shrink: kernel 1 + 5 - 3
    ((8, 3, 3), (6, 5, 5), nn.ConvTranspose2d, (3, 3)),     # other growth (adakd): transposed kernel 1 + 5 - 3
])
def test_convreg_geometry(in_shape, out_shape, kind, kernel):
    reg = ConvReg(in_shape, out_shape)
    assert type(reg.conv) is kind and tuple(reg.conv.kernel_size) == kernel
    assert isinstance(reg.bn, nn.BatchNorm2d) and isinstance(reg.relu, nn.ReLU)
    out = reg(torch.randn(2, *in_shape))
    assert out.shape == (2, *out_shape) and out.min() >= 0
    assert isinstance(ConvReg(in_shape, out_shape, relu=False).relu, nn.Identity)


def test_convreg_vectors_and_impossible_pairs():
    reg = ConvReg((7,), (5,))
    assert isinstance(reg.conv, nn.Linear) and reg(torch.randn(3, 7)).shape == (3, 5)
    with pytest.raises(ValueError, match="maps"):
        ConvReg((7,), (5, 2, 2))
    with pytest.raises(ValueError, match="grows"):
        ConvReg((4, 8, 2), (4, 4, 4))


def test_fitnets_module_masks_gradients_and_teacher():
    fitnets = FitNets(["stage2"], [(3, 4, 4)], [(5, 2, 2)]).double().eval()
    student = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    plain = check_all_ones_mask(fitnets, "fitnets/stage2", student, teacher)
    assert torch.allclose(plain, F.mse_loss(fitnets.regressors[0](student), teacher))
    mask = torch.tensor([1.0, 0, 1, 0, 0, 1])
    one_spot(fitnets, "fitnets/stage2", student, teacher, masks=[mask]).backward()
    # Eval mode: in train mode the regressor's BatchNorm couples samples through batch statistics (as in [R]).
    assert_gradients_follow_mask(student, mask)
    assert teacher.grad is None
    assert all(p.grad is not None for p in fitnets.trainable_parameters())


def test_fitnets_state_dict_round_trip():
    first = FitNets(["stage2"], [(3, 4, 4)], [(5, 4, 4)])
    first([torch.randn(8, 3, 4, 4)], [torch.randn(8, 5, 4, 4)], torch.zeros(8, dtype=torch.long))  # BN stats move
    second = FitNets(["stage2"], [(3, 4, 4)], [(5, 4, 4)])
    check_state_dict_round_trip(first, second, "fitnets/stage2", (3, 4, 4), (5, 4, 4))


@pytest.mark.parametrize("teacher_name,student_name", list(HEAD_SIZES))
def test_fitnets_on_zoo_pairs_with_reference_head_sizes(teacher_name, student_name):
    pair = zoo_pair("fitnets", teacher_name, student_name)
    assert pair.distiller.defaults == D.DistillerDefaults(ce_weight=1.0, method_weight=100.0, spots=(2,))
    assert pair.student_spots == pair.teacher_spots == [2]
    assert sum(p.numel() for p in pair.distiller.parameters()) == HEAD_SIZES[(teacher_name, student_name)]
    assert list(pair.out) == ["fitnets/stage2"] and torch.isfinite(pair.out["fitnets/stage2"])
