"""VID: the Gaussian likelihood by hand, regressors and variances, masks, real zoo pairs."""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import adakd.distillers as D
import adakd.models as M
from adakd.distillers.vid import VID, VIDConfig, vid_loss

PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
# reference/model-zoo.md §6: every body stage's regressor plus its log-scale vector, keyed (teacher, student).
REGRESSOR_PARAMS = {("wrn_40_2", "wrn_16_2"): 64_736, ("resnet32x4", "resnet8x4"): 258_496,
                    ("vgg13", "vgg8"): 1_820_032, ("vgg13", "MobileNetV2"): 1_325_952,
                    ("ResNet50", "MobileNetV2"): 11_533_056, ("resnet32x4", "ShuffleV1"): 495_040}


@functools.lru_cache(maxsize=None)
def zoo_model(name):
    """A staged zoo model and its features on a fixed batch of 4, built once per test file."""
    model = M.staged(M.create(name))
    with torch.no_grad():
        features = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))).features
    return model, features


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
    targets = torch.zeros(6, dtype=torch.long)
    plain = vid([student], [teacher], targets)["vid/stage1"]
    assert torch.equal(plain, vid([student], [teacher], targets, masks=[torch.ones(6)])["vid/stage1"])
    # The 4x4 student map is averaged over 2x2 cells before the regressor.
    pooled = student.reshape(6, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    per_sample = vid_loss(vid.regressors[0](pooled), teacher, vid.log_scales[0])
    assert torch.allclose(plain, per_sample.mean())
    mask = torch.tensor([1.0, 0, 0, 1, 1, 0])
    masked = vid([student], [teacher], targets, masks=[mask])["vid/stage1"]
    assert torch.allclose(masked, (per_sample * mask).sum() / 6)
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[mask == 0] == 0) and torch.all(student.grad[mask == 1].flatten(1).abs().sum(1) > 0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vid.parameters())


def test_vid_rejects_pooled_vectors():
    with pytest.raises(ValueError, match="feature maps"):
        VID(["pooled"], [(64,)], [(64,)])


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_vid_on_zoo_pairs(teacher_name, student_name):
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create("vid", student, teacher, (3, 32, 32))
    assert distiller.defaults.method_weight == 1.0 and distiller.defaults.spots == ("stages",)
    assert sum(p.numel() for p in distiller.parameters()) == REGRESSOR_PARAMS[(teacher_name, student_name)]
    inputs = ([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], torch.zeros(4, dtype=torch.long))
    out = distiller(*inputs)
    assert list(out) == [f"vid/stage{k}" for k in range(1, student.num_stages - 2)]
    assert all(torch.isfinite(v) for v in out.values())
    restored, _, _ = D.create("vid", student, teacher, (3, 32, 32))
    restored.load_state_dict(distiller.state_dict())
    assert all(torch.equal(restored(*inputs)[k], v) for k, v in out.items())
