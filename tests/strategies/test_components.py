"""Adaptive components: how a run names them, their options, and the strategy they join (the protocol itself;
CTKD and DOT have their own test files)."""
from __future__ import annotations

import pytest
from cli_checks import fails
from tiny_run import TINY_RUN

from adakd.options import OptionsError
from adakd.registry import UnknownNameError
from adakd.strategies.components import COMPONENTS, Component, build_components, normalise_spec


def test_true_switches_a_component_on_and_false_or_null_leave_it_off():
    assert normalise_spec({"a": True, "b": False, "c": None, "d": {"x": 1}}) == {"a": {}, "d": {"x": 1}}
    assert normalise_spec(None) == {}


@pytest.mark.parametrize("spec, fragment", [
    (3, "components: expected a mapping of component names to their options, got int 3"),
    ({"a": 0.5}, "components.a: expected true, false or a mapping of its options, got 0.5"),
])
def test_a_malformed_components_entry_names_itself(spec, fragment):
    with pytest.raises(OptionsError, match=fragment.replace(".", r"\.")):
        normalise_spec(spec)


def test_an_unknown_component_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown component 'nope'"):
        build_components({"nope": True})


def distill_argv(tmp_path, teacher, *extra: str) -> list[str]:
    return ["distill", *TINY_RUN, "data.name=synthetic", f"out_dir={tmp_path / 'runs'}", "teacher.name=resnet8",
            f"teacher.weights={teacher}", *extra]


def test_a_component_refused_by_the_strategy_is_one_cli_line(tmp_path, capsys, monkeypatch, random_teacher):
    class Refuses(Component):
        name = "refuses"

        def attach(self, strategy) -> None:
            raise ValueError(f"refuses is not defined with {type(strategy).__name__}; drop components.refuses")

    monkeypatch.setitem(COMPONENTS._builders, "refuses", Refuses)
    fails(capsys, distill_argv(tmp_path, random_teacher(), "components.refuses=true"),
          "components: refuses is not defined with Standard; drop components.refuses")


def test_an_unknown_component_is_one_cli_line(tmp_path, capsys, random_teacher):
    fails(capsys, distill_argv(tmp_path, random_teacher(), "components.nope=true"), "unknown component 'nope'")


def test_a_bad_component_option_names_its_key(tmp_path, capsys, random_teacher, monkeypatch):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Options:
        rate: float = 0.5

    class Rated(Component):
        name = "rated"
        option_class = Options

    monkeypatch.setitem(COMPONENTS._builders, "rated", Rated)
    assert build_components({"rated": {"rate": 2}})[0].options == Options(rate=2.0)
    fails(capsys, distill_argv(tmp_path, random_teacher(), "components.rated.rte=1"),
          "unknown option components.rated.rte; did you mean components.rated.rate?")


def test_the_strategy_adds_each_component_once():
    from adakd.strategies.standard import Standard
    from torch import nn

    strategy = Standard(nn.Linear(2, 2), None, None, __import__("adakd").strategies.LossWeights())
    strategy.add_component(Component())
    with pytest.raises(ValueError, match="added twice"):
        strategy.add_component(Component())


@pytest.mark.parametrize("strategy, component, reason", [
    ("abl", "ctkd", "ABL forms each block's KD gradient explicitly"),
    ("abl-fixed", "dot", "no task and distillation gradients apart"),
    ("none", "ctkd", "it trains the student on CE alone"),
])
def test_a_refused_combination_fails_with_the_names_before_any_run(strategy, component, reason):
    # check_names runs when a sweep is planned: a grid crossing them is refused whole, before a cell starts.
    from adakd.engine.build import check_names
    from adakd.engine.config import ConfigError, resolve

    config = resolve(["cifar100", "pair-resnet56-resnet20"],
                     overrides=[f"strategy={strategy}", f"components.{component}=true"])
    with pytest.raises(ConfigError, match=f"components: {component} is not defined with .*{reason}"):
        check_names(config)
