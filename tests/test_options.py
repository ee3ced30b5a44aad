"""Issue 20: the one options resolver (adakd.options) and the three callers that go through it: the engine config,
a distiller's args and a strategy's options."""
from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from adakd import distillers, strategies
from adakd.distillers.base import build_config
from adakd.distillers.kd import KDConfig
from adakd.engine.config import ConfigError, from_dict, preset_names, resolve
from adakd.options import OptionsError, build_options, coerce, to_plain
from adakd.strategies.abl import ABL
from adakd.strategies.base import OptionError, Strategy
from adakd.strategies.sakd import SAKD
from cli_checks import fails
from tiny_run import TINY_RUN


@dataclass(frozen=True)
class Inner:
    width: int = 4
    name: str = "a"


@dataclass(frozen=True)
class Small:
    tau: float = 1.0
    steps: int = 3
    flag: bool = False
    limit: float | None = None
    spot: int | str = -1
    betas: tuple[float, float] = (0.5, 0.9)
    p1: tuple[float, ...] = ()
    gamma: tuple[tuple[float, ...], ...] | None = None
    anything: tuple = ()
    mode: Literal["train", "eval"] = "train"
    level: Literal[1, 2] = 1
    inner: Inner = field(default_factory=lambda: Inner(width=8))
    weights: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    plan: dict | None = field(default=None, metadata={"resolved": True})


@dataclass(frozen=True)
class Empty:
    """Options of a class that takes none."""


def refused(values: dict[str, Any], where: str = "x") -> OptionsError:
    with pytest.raises(OptionsError) as info:
        build_options(Small, values, where)
    return info.value


# ---- coercion rules


def test_ints_become_floats_and_lists_become_tuples():
    got = build_options(Small, {"tau": 2, "limit": 3, "betas": [0, 1], "p1": [1, 0.5], "gamma": [[1, 0], [0.5, 2]],
                                "anything": [1, "a"], "spot": "stages"})
    assert got.tau == 2.0 and type(got.tau) is float and type(got.limit) is float
    assert got.betas == (0.0, 1.0) and all(type(b) is float for b in got.betas)
    assert got.p1 == (1.0, 0.5) and got.gamma == ((1.0, 0.0), (0.5, 2.0)) and type(got.gamma[0]) is tuple
    assert got.anything == (1, "a") and got.spot == "stages"
    assert build_options(Small, {"spot": 2}).spot == 2 and build_options(Small, {"limit": None}).limit is None


@pytest.mark.parametrize("values, text", [
    ({"tau": "x"}, "x.tau: expected float, got str 'x'"),
    ({"steps": 1.5}, "x.steps: expected int, got float 1.5"),
    ({"steps": True}, "x.steps: expected int, got the boolean True"),
    ({"tau": False}, "x.tau: expected float, got the boolean False"),
    ({"flag": 1}, "x.flag: expected bool, got int 1"),
    ({"limit": "big"}, "x.limit: expected float, got str 'big'"),  # X | None: the member's own error
    ({"spot": True}, "x.spot: expected int | str, got True"),
    ({"spot": 1.5}, "x.spot: expected int | str, got 1.5"),
    ({"betas": 0.5}, "x.betas: expected a list, got 0.5"),
    ({"betas": [0.5]}, "x.betas: expected a list of 2 values, got [0.5]"),
    ({"p1": [0.5, "a"]}, "x.p1[1]: expected float, got str 'a'"),
    ({"gamma": [[1.0, 0.0], 2.0]}, "x.gamma[1]: expected a list, got 2.0"),
    ({"gamma": [[1.0, "z"]]}, "x.gamma[0][1]: expected float, got str 'z'"),
    ({"mode": "test"}, "x.mode: must be one of ['train', 'eval'], got 'test'"),
    ({"level": True}, "x.level: must be one of [1, 2], got True"),  # True == 1, but is not one of them
    ({"inner": 3}, "x.inner: expected a mapping of Inner fields, got 3"),
    ({"inner": {"width": "w"}}, "x.inner.width: expected int, got str 'w'"),
    ({"weights": [1]}, "x.weights: expected a mapping, got [1]"),
    ({"weights": {"a": "heavy"}}, "x.weights.a: expected float, got str 'heavy'"),
])
def test_a_value_of_the_wrong_type_names_its_dotted_key(values, text):
    err = refused(values)
    assert str(err) == text and isinstance(err, ValueError)
    assert err.key == text.split(":")[0] and str(err) == f"{err.key}: {err.problem}"


def test_allowed_values_and_mappings_pass():
    got = build_options(Small, {"mode": "eval", "level": 2, "weights": {"a": 1}, "extra": {"k": [1, "v"]}})
    assert got.mode == "eval" and got.level == 2 and got.weights == {"a": 1.0} and type(got.weights["a"]) is float
    assert got.extra == {"k": [1, "v"]}  # dict[str, Any]: the values as given


def test_a_partial_nested_mapping_keeps_the_fields_default_for_what_it_omits():
    assert build_options(Small, {"inner": {"name": "b"}}).inner == Inner(width=8, name="b")  # not Inner()'s 4
    assert build_options(Small, {}).inner == Inner(width=8)


def test_an_unknown_key_suggests_the_close_one_or_lists_the_valid_ones():
    err = refused({"taus": 1, "zzz": 2})
    assert str(err) == "unknown option x.taus; did you mean x.tau?" and err.key == "x.taus"
    assert err.unknown == ("taus", "zzz")
    err = refused({"qqqq": 1}, where="")
    assert str(err).startswith("unknown option qqqq; valid keys: tau, steps, flag, limit, spot, betas, ")
    with pytest.raises(OptionsError, match=r"^unknown config key x\.inner\.widht; did you mean x\.inner\.width\?$"):
        build_options(Small, {"inner": {"widht": 1}}, "x", noun="config key")
    with pytest.raises(OptionsError, match="unknown option x.nothing; valid keys: none"):
        build_options(Empty, {"nothing": 1}, "x")


def test_a_resolved_field_is_not_an_option():
    assert refused({"plan": {}}).unknown == ("plan",)


def test_layers_lie_under_the_values_and_are_checked_too():
    got = build_options(Small, {"tau": 3}, layers=({"tau": 1, "steps": 5}, {"steps": 7}))
    assert (got.tau, got.steps) == (3.0, 7)
    with pytest.raises(OptionsError, match=r"^steps: expected int, got str 'many'$"):
        build_options(Small, {}, layers=({"steps": "many"},))


@dataclass(frozen=True)
class Checked:
    rate: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise OptionsError("rate", f"must lie in (0, 1), got {self.rate}")


def test_the_classes_own_check_gets_the_dotted_key():
    with pytest.raises(OptionsError) as info:
        build_options(Checked, {"rate": 2}, "distill.args")
    assert str(info.value) == "distill.args.rate: must lie in (0, 1), got 2.0" and info.value.key == "distill.args.rate"


def test_the_error_survives_pickling_and_coerce_checks_one_value():
    err = pickle.loads(pickle.dumps(refused({"taus": 1})))
    assert (str(err), err.key, err.unknown) == ("unknown option x.taus; did you mean x.tau?", "x.taus", ("taus",))
    assert coerce([1, 2], tuple[float, ...], "k") == (1.0, 2.0)
    assert to_plain(Small())["betas"] == [0.5, 0.9] and to_plain(Small())["inner"] == {"width": 8, "name": "a"}


# ---- the callers


def test_the_engine_config_goes_through_it_and_still_raises_config_error():
    with pytest.raises(ConfigError) as info:
        resolve(["cifar100"], overrides=["optim.milestones=[10, x]"])
    assert str(info.value) == "optim.milestones[1]: expected int, got str 'x'"
    assert not isinstance(info.value, OptionsError)  # callers catch ConfigError, as before
    with pytest.raises(ConfigError, match=r"^distill\.by_method\.kd\.ce_weight: expected float, got str 'a'$"):
        resolve(["cifar100"], overrides=["distill.by_method={kd: {ce_weight: a}}"])


def test_a_distillers_args_are_type_checked():
    assert build_config(KDConfig, {"temperature": 2}, "distill.args") == KDConfig(temperature=2.0)
    with pytest.raises(OptionsError) as info:
        build_config(KDConfig, {"temperature": "hot"}, "distill.args")
    assert str(info.value) == "distill.args.temperature: expected float, got str 'hot'"
    with pytest.raises(OptionsError,
                       match=r"^unknown config key distill\.args\.tempp; valid keys: temperature, standardize$"):
        build_config(KDConfig, {"tempp": 3}, "distill.args")


def test_a_strategys_options_are_checked_against_their_annotations():
    with pytest.raises(OptionError) as info:  # the strategies' name for the one error class
        SAKD.resolve_options({"gumbel_tau": "x"})
    assert str(info.value) == "gumbel_tau: expected float, got str 'x'" and info.value.key == "gumbel_tau"
    with pytest.raises(OptionsError, match=r"^homo: expected bool, got str 'yes'$"):
        SAKD.resolve_options({"homo": "yes"})
    # The YAML lists of ABL's p1, gamma and meta_betas become tuples from the annotations, not by name.
    options = ABL.resolve_options({"p1": [1, 0.5], "gamma": [[1, 0]], "meta_betas": [0, 0.5]})
    assert options.p1 == (1.0, 0.5) and options.gamma == ((1.0, 0.0),) and options.meta_betas == (0.0, 0.5)
    with pytest.raises(ValueError, match=r"^unknown strategy option\(s\) \['gumbel_tauu'\] for SAKD; did you mean "
                                         r"gumbel_tau\?$"):
        SAKD.resolve_options({"gumbel_tauu": 1})
    with pytest.raises(ValueError, match=r"unknown strategy option\(s\) \['search_plan'\] for ABL"):
        ABL.resolve_options({"search_plan": {}})  # set by the options themselves
    with pytest.raises(ValueError, match=r"^unknown strategy option\(s\) \['x'\] for Strategy; it takes none$"):
        Strategy.resolve_options({"x": 1})


def distill_argv(tmp_path: Path, teacher: Path, *extra: str) -> list[str]:
    return ["distill", "--preset", "demo", *TINY_RUN, f"out_dir={tmp_path / 'runs'}", "teacher.name=resnet8",
            f"teacher.weights={teacher}", *extra]


@pytest.mark.parametrize("extra, line", [
    (["method=kd", "distill.args.temperature=hot"], "distill.args.temperature: expected float, got str 'hot'"),
    (["method=dkd", "distill.args.warmup_epochs=2.5"], "distill.args.warmup_epochs: expected int, got float 2.5"),
    (["strategy=sakd", "strategy.args.gumbel_tau=x"], "strategy.args.gumbel_tau: expected float, got str 'x'"),
    (["strategy=abl", "strategy.args.p1=[0.3,x]"], "strategy.args.p1[1]: expected float, got str 'x'"),
])
def test_a_wrong_type_is_one_line_naming_the_dotted_key(tmp_path, capsys, random_teacher, extra, line):
    assert fails(capsys, distill_argv(tmp_path, random_teacher(), *extra)) == f"adakd: error: {line}"
    assert not (tmp_path / "runs").exists()


def test_every_shipped_preset_gives_its_distillers_args_of_the_annotated_types():
    checked = 0
    for preset in preset_names():
        config = resolve([preset], overrides=["task=distill", "teacher.name=resnet8"])
        for method in {config.distill.method, *config.distill.by_method}:
            args = dataclasses.replace(config.distill, method=method).for_method().args
            build_config(distillers.get(method).config_class, dict(args), "distill.args")
            checked += 1
        strategies.get(config.strategy.name).resolve_options(dict(config.strategy.args))
    assert checked > len(preset_names())  # the by_method entries were reached


@pytest.mark.slow
def test_every_shipped_grid_cell_gives_distiller_args_and_strategy_options_of_the_annotated_types():
    from adakd.experiments.sweep import grid_names, load_grid, plan

    cells = 0
    for name in grid_names():
        label, source = load_grid(name)
        for cell in plan(source, label, Path("/nonexistent") / name, check_teachers=False):
            config = from_dict(cell.config)
            if config.task == "distill":
                args = config.distill.for_method().args
                build_config(distillers.get(config.distill.method).config_class, dict(args), "distill.args")
            strategies.get(config.strategy.name).resolve_options(dict(config.strategy.args))
            cells += 1
    assert cells > 1000
