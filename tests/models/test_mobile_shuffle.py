"""Family checks for MobileNetV2 (both widths), ShuffleV1 and ShuffleV2 that the generic zoo test does not make."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adakd.models as models
from adakd.models.checkpoint import CheckpointError

FAMILIES = ["MobileNetV2", "mobilev2", "ShuffleV1", "ShuffleV2"]
POOLED_DIM = {"MobileNetV2": 1280, "mobilev2": 1280, "ShuffleV1": 960, "ShuffleV2": 1024}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _eval_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name).eval()


@pytest.mark.parametrize(
    ("name", "params_at_100"), [("MobileNetV2", 812_836), ("mobilev2", 2_353_060)]
)
@pytest.mark.parametrize("num_classes", [100, 200])
def test_mobilenetv2_parameter_counts(name: str, params_at_100: int, num_classes: int) -> None:
    expected = params_at_100 + (num_classes - 100) * (1280 + 1)
    assert _num_params(models.create(name, num_classes=num_classes)) == expected


def test_mobilev2_has_the_published_count_at_200_classes() -> None:
    assert _num_params(models.create("mobilev2", num_classes=200)) == 2_481_160


def test_width_mult_builds_other_widths() -> None:
    full = models.create("MobileNetV2", width_mult=1.0)
    assert [tuple(t.shape) for t in full.state_dict().values()] == [
        tuple(t.shape) for t in models.create("mobilev2").state_dict().values()
    ]
    wide = models.create("mobilev2", width_mult=1.5).eval()
    assert wide.classifier[0].in_features == 1920
    with torch.no_grad():
        assert wide(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError, match="width_mult"):
        models.create("mobilev2", width_mult=0.0)


def test_mobilenetv2_widths_share_keys_but_not_shapes(tmp_path) -> None:
    half, full = models.create("MobileNetV2"), models.create("mobilev2")
    assert list(half.state_dict()) == list(full.state_dict())
    path = tmp_path / "mobilev2.pth"
    torch.save({"model": full.state_dict()}, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        models.load_weights(half, path, model_name="MobileNetV2")
    torch.save(half.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        models.load_weights(full, path, model_name="mobilev2")


def test_mobilenetv2_residual_only_where_shapes_match() -> None:
    model = models.create("MobileNetV2")
    units = [unit for group in model.blocks for unit in group]
    assert len(units) == 17
    # Units that keep channels and resolution: the non-first units of groups 1, 2, 3, 4 and 5.
    assert [unit.use_residual for unit in units].count(True) == 10
    assert not units[0].use_residual


def test_shufflev1_first_unit_uses_one_group() -> None:
    model = models.create("ShuffleV1")
    units = [unit for layer in (model.layer1, model.layer2, model.layer3) for unit in layer]
    assert units[0].conv1.groups == 1 and units[0].conv1.in_channels == 24
    assert all(unit.conv1.groups == 3 for unit in units[1:])
    assert all(unit.conv3.groups == 3 for unit in units)


# ShuffleV1's pre-activation is the stage output before its ReLU; ShuffleV2's is also taken before the channel
# shuffle, so only shuffling it first gives the stage output back.
@pytest.mark.parametrize(
    ("name", "to_output", "same_order"),
    [("ShuffleV1", torch.relu, True), ("ShuffleV2", lambda p: torch.relu(F.channel_shuffle(p, 2)), False)],
)
def test_shufflenet_stage_preacts(name: str, to_output, same_order: bool) -> None:
    view = models.staged(_eval_model(name))
    with torch.no_grad():
        out = view(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), preact=True)
    for stage in (1, 2, 3):
        preact, feature = out.preacts[stage], out.features[stage]
        assert (preact < 0).any()
        assert torch.equal(to_output(preact), feature)
        assert torch.equal(preact.relu(), feature) == same_order


def test_mobilenetv2_preact_equals_features() -> None:
    view = models.staged(_eval_model("MobileNetV2"))
    with torch.no_grad():
        out = view(torch.randn(2, 3, 32, 32), preact=True)
    assert all(torch.equal(p, f) for p, f in zip(out.preacts, out.features))
    assert (out.features[4] < 0).any()  # linear bottlenecks: no ReLU on stage outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_64x64_inputs_keep_the_pooled_size(name: str) -> None:
    model = _eval_model(name)
    view = models.staged(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 100)
        feats = view(x).features
    assert feats[-2].shape == (2, POOLED_DIM[name])
    assert view.feature_shapes((3, 64, 64))[-2] == (POOLED_DIM[name],)


@pytest.mark.parametrize("name", FAMILIES)
def test_staged_forward_equals_model_forward(name: str) -> None:
    model = _eval_model(name)
    view = models.staged(model)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(view(x).features[-1], logits)
        assert torch.equal(view(x, preact=True).features[-1], logits)
        assert torch.equal(view.run(view.run(x, 0, 2), 3, -1), logits)
