"""VID: the Gaussian likelihood by hand, regressors and variances, masks, real zoo pairs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adakd.distillers.vid import VID, VIDConfig, vid_loss
from distiller_checks import (PAIRS, assert_gradients_follow_mask, assert_zoo_state_dict_round_trip,
                              check_all_ones_mask, one_spot, zoo_pair)

# reference/model-zoo.md §6: every body stage's regressor plus its log-scale vector, keyed (teacher, student).
REGRESSOR_PARAMS = {("wrn_40_2", "wrn_16_2"): 64_736, ("resnet32x4", "resnet8x4"): 258_496,
                    ("vgg13", "vgg8"): 1_820_032, ("vgg13", "MobileNetV2"): 1_325_952,
                    ("ResNet50", "MobileNetV2"): 11_533_056, ("resnet32x4", "ShuffleV1"): 495_040}


def test_vid_by_hand_on_two_samples_two_channels():
    mean = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]], [[[0.5, 0.5]], [[2.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[0.5, -0.5]], [[0.0, 3.0]]]], dtype=torch.float64)
    log_scale = torch.tensor([0.3, -1.2], dtype=torch.float64)
    eps = 1e-5
    variances = [math.log1p(math.exp(v)) + eps for v in log_scale.tolist()]
    expected = []
    for mu_sample, t_sample in zip(mean.tolist(), target.tolist()):
        terms = [0.5 * ((mu - t) ** 2 / var + math.log(var))
                 for mu_channel, t_channel, var in zip(mu_sample, t_sample, variances)
                 for mu, t in zip(mu_channel[0], t_channel[0])]
        expected.append(sum(terms) / len(terms))
    assert torch.allclose(vid_loss(mean, target, log_scale, eps), torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-13, atol=0)


def test_vid_gradient_matches_finite_differences():
    mean = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    log_scale = torch.randn(2, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, s: vid_loss(m, target, s), (mean, log_scale))


def test_vid_module_pools_regresses_and_masks():
    # A wider middle than C_t = 2 keeps some ReLU alive for every sample of this tiny regressor.
    vid = VID(["stage1"], [(3, 4, 4)], [(2, 2, 2)], VIDConfig(mid_channels=8)).double()
    assert vid.regressors[0][2].weight.shape == (8, 8, 1, 1)
    assert [name for name, _ in vid.named_parameters()][-1] == "log_scales.0"
    variance = F.softplus(vid.log_scales[0]) + 1e-5
    assert torch.allclose(variance, torch.full((2,), 5.0, dtype=torch.float64), rtol=1e-6)  # a float32 parameter
    student = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    plain = check_all_ones_mask(vid, "vid/stage1", student, teacher)
    # The 4x4 student map is averaged over 2x2 cells before the regressor.
    pooled = student.reshape(6, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    per_sample = vid_loss(vid.regressors[0](pooled), teacher, vid.log_scales[0])
    assert torch.allclose(plain, per_sample.mean())
    mask = torch.tensor([1.0, 0, 0, 1, 1, 0])
    masked = one_spot(vid, "vid/stage1", student, teacher, masks=[mask])
    assert torch.allclose(masked, (per_sample * mask).sum() / 6)
    masked.backward()
    assert teacher.grad is None
    assert_gradients_follow_mask(student, mask)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vid.parameters())


def test_vid_rejects_pooled_vectors():
    with pytest.raises(ValueError, match="feature maps"):
        VID(["pooled"], [(64,)], [(64,)])


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_vid_on_zoo_pairs(teacher_name, student_name):
    pair = zoo_pair("vid", teacher_name, student_name)
    distiller, out = pair.distiller, pair.out
    assert distiller.defaults.method_weight == 1.0 and distiller.defaults.spots == ("stages",)
    assert sum(p.numel() for p in distiller.parameters()) == REGRESSOR_PARAMS[(teacher_name, student_name)]
    assert list(out) == [f"vid/stage{k}" for k in range(1, pair.student.num_stages - 2)]
    assert all(torch.isfinite(v) for v in out.values())
    assert_zoo_state_dict_round_trip("vid", pair)
