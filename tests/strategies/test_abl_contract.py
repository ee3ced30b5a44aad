"""ABL wraps every distiller of the library and every student of the zoo: one step each, finite and complete."""
from __future__ import annotations

import pytest
import torch

from adakd import distillers, models, strategies
from markers import slow_except
from adakd.distillers.base import DistillContext
from adakd.engine.config import OptimConfig
from adakd.engine.optim import build_optimizers
from adakd.strategies.base import LossWeights
from adakd.engine.config import load_preset, preset_names

IMAGENET = {"resnet18", "resnet34", "resnet50", "ResNet50", "mobilenetv1"}
_PAIRS = [load_preset(name) for name in preset_names() if name.startswith("pair-")]
# Models the pair presets use only as teachers never carry ABL's heads.
STUDENTS = sorted(set(models.available()) - ({p["teacher"]["name"] for p in _PAIRS} -
                                             {p["model"]["name"] for p in _PAIRS}))


def one_step(student: str, teacher: str, method: str, size: int, strategy: str = "abl-fixed"):
    """Build the strategy, take one step; return (strategy, step output, parameters before)."""
    torch.manual_seed(0)
    s = models.staged(models.create(student, num_classes=10))
    t = models.frozen(models.create(teacher, num_classes=10))
    context = DistillContext(num_classes=10, train_targets=torch.arange(64) % 10)
    kwargs = {"num_negatives": 16} if method == "crd" else {}
    d, s_spots, t_spots = distillers.create(method, s, t, (3, size, size), None, context, **kwargs)
    weights = LossWeights(ce=type(d).defaults.ce_weight, method=type(d).defaults.method_weight)
    st = strategies.get(strategy)(s, t, d, weights, s_spots, t_spots, input_size=size)
    st.attach(build_optimizers(st.param_groups(), OptimConfig(), 0.01), st.precision, 10)
    st.train(True)
    before = {id(p): p.detach().clone() for p in s.parameters()}
    x = torch.randn(4, 3, size, size)
    out = st.training_step(x, torch.arange(4) % 10, torch.arange(4), 30, 0)
    return st, out, before


@pytest.mark.parametrize("method", distillers.available())
def test_every_distiller_under_abl(method):
    st, out, before = one_step("resnet8", "resnet14", method, 32)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert any(name.startswith(method) for name in out)
    for param in st.student_module.parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all()


# The inner loop keeps one model of each family (CIFAR ResNet, VGG, MobileNet, ShuffleNet, WRN, ImageNet ResNet).
@pytest.mark.parametrize("student", slow_except(STUDENTS, ["resnet8", "vgg8", "MobileNetV2", "ShuffleV2", "wrn_16_2", "resnet18"]))
def test_every_student_under_abl(student):
    size = 64 if student in IMAGENET else 32
    teacher = "resnet18" if student in IMAGENET else "resnet8"
    st, out, before = one_step(student, teacher, "kd", size)
    assert torch.isfinite(out["loss"])
    assert len(st.heads) == st.num_blocks - 1
    missing = [n for n, p in st.student_module.named_parameters() if p.grad is None]
    assert not missing, missing
    moved = sum(not torch.equal(before[id(p)], p.detach()) for p in st.student_module.parameters())
    assert moved == len(before)


def test_feature_distiller_on_a_heterogeneous_pair():
    st, out, _ = one_step("mobilev2", "resnet8x4", "crd", 32)
    assert torch.isfinite(out["loss"]) and any(k.startswith("crd/") for k in out)
