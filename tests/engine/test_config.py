"""Config: defaults, presets, dotted overrides and the errors that name the key."""
from __future__ import annotations

import pytest

from adakd.engine.config import ConfigError, RunConfig, dump_yaml, from_dict, parse_override, preset_names, resolve
from adakd.engine.config import to_dict


def test_defaults_are_the_cifar_recipe():
    config = resolve(["cifar100"])
    assert config.optim.lr == 0.05 and config.optim.momentum == 0.9 and config.optim.weight_decay == 5e-4
    assert config.optim.epochs == 240 and config.optim.milestones == (150, 180, 210)
    assert config.data.batch_size == 64 and config.distill.temperature == 4.0


def test_overrides_are_typed_and_nested():
    config = resolve(["cifar100"], overrides=["optim.lr=0.01", "optim.milestones=[1,2]", "model.name=resnet8",
                                             "distill.args={foo: 1}", "data.root=/x"])
    assert config.optim.lr == 0.01 and config.optim.milestones == (1, 2)
    assert config.model.name == "resnet8" and config.distill.args == {"foo": 1} and config.data.root == "/x"
    # An int where a float is declared is accepted and converted.
    assert isinstance(resolve(overrides=["optim.lr=1"]).optim.lr, float)


def test_partial_section_keeps_other_defaults():
    config = resolve(overrides=["model.weights=/w.pth"])
    assert config.model.name == "resnet20" and config.model.weights == "/w.pth"


@pytest.mark.parametrize("override, fragment", [
    ("optim.lrr=0.1", "unknown config key optim.lrr; did you mean optim.lr?"),
    ("bogus=1", "unknown config key bogus"),
    ("optim.epochs=ten", "optim.epochs: expected int"),
    ("optim.epochs=2.5", "optim.epochs: expected int"),
    ("optim.lr=true", "optim.lr: expected float, got the boolean"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.milestones=[3,1]", "optim.milestones must be increasing"),
    ("optim=3", "optim: expected a mapping"),
    ("task=distill", "teacher.name must name the teacher"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(["cifar100"], overrides=[override])
    assert fragment in str(info.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("optim..lr=1")


def test_presets_ship_and_unknown_preset_suggests():
    assert {"cifar100", "demo", "imagenet", "tiny-imagenet"} <= set(preset_names())
    assert resolve(["cifar100", "demo"]).data.name == "digits"
    with pytest.raises(ConfigError, match="Did you mean demo"):
        resolve(["dem"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(files=[bad])
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 0.2\nmodel:\n  name: resnet8\n")
    assert resolve(files=[good]).optim.lr == 0.2


def test_round_trip_through_yaml_dict():
    config = resolve(["cifar100"], overrides=["optim.milestones=[5]", "distill.spots=[1,2]"])
    assert from_dict(to_dict(config)) == config
    assert "milestones" in dump_yaml(config)
    assert isinstance(from_dict({}), RunConfig)


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_resolves_and_names_registered_entries(name):
    from adakd import distillers, models, strategies

    # Under a distillation run: a SAKD preset is refused by `adakd train` (it would be ignored there).
    config = resolve(["cifar100", name], base={"task": "distill", "teacher": {"name": "resnet56"}})
    for spec in (config.model, config.teacher):
        assert spec.name is None or spec.name in models.available()
    assert config.strategy.name in strategies.available()
    assert set(config.distill.by_method) <= set(distillers.available())


def test_pair_and_sakd_presets_compose():
    config = resolve(["cifar100", "pair-vgg13-MobileNetV2", "sakd-faithful"], overrides=["method=dkd"])
    assert (config.teacher.name, config.model.name, config.optim.lr) == ("vgg13", "MobileNetV2", 0.01)
    assert config.strategy.name == "sakd-faithful" and config.distill.kl_weight == 1.0
    assert config.distill.for_method().args == {"beta": 6.0}
    config = resolve(["cifar100", "sakd"], overrides=["method=fitnets", "task=distill", "teacher.name=resnet56"])
    assert config.distill.for_method().method_weight == 1.0
