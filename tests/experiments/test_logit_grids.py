"""Issue 21's grids: each cell runs the values its source publishes (checked against the code's own tables)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from adakd.distillers.kd import LS_CIFAR100_PAIRS
from adakd.experiments.sweep import load_grid, plan


@functools.lru_cache(maxsize=None)
def planned(name: str) -> tuple:
    """Every cell of a shipped grid, planned once per session (ls-table's 342 take ~3 s); tests only read them."""
    label, source = load_grid(name)
    return tuple(plan(source, label, Path("/nonexistent") / name, check_teachers=False))


def grid_cells(name: str) -> dict[tuple[str, ...], dict]:
    """The first seed's config of every grid cell, by its coordinates."""
    cells = planned(name)
    return {tuple(c.coords.values()): c.config for c in cells if c.role == "cell" and c.seed == cells[0].seed}


@pytest.mark.slow  # plans ls-table's 342 cells (3 s; planned once for both ls-table tests)
def test_ls_table_runs_ls_s_own_per_pair_values():
    cells = grid_cells("ls-table")
    pairs = {coords[0] for coords in cells}
    assert pairs == set(LS_CIFAR100_PAIRS)
    for pair, methods in LS_CIFAR100_PAIRS.items():
        for method, label in (("kd", "kd-ls"), ("dkd", "dkd-ls")):
            distill = cells[(pair, label)]["distill"]
            expected = methods[method]
            assert distill["method"] == method
            assert distill["ce_weight"] == expected["ce_weight"] and distill["method_weight"] == expected["method_weight"]
            assert {k: distill["args"][k] for k in expected["args"]} == expected["args"], (pair, label)
        assert cells[(pair, "kd")]["distill"]["args"].get("standardize", False) is False
        assert cells[(pair, "ctkd")]["components"] == {"ctkd": True}
        ctkd_ls = cells[(pair, "ctkd-ls")]
        assert ctkd_ls["distill"]["args"]["standardize"] is True and ctkd_ls["distill"]["method_weight"] == 9.0
        assert ctkd_ls["distill"]["ce_weight"] == 0.1
        # MLKD's rows run the authors' recipe: 480 epochs (960 for ShuffleV2), the milestones unscaled.
        for label in ("mlkd", "mlkd-ls"):
            optim = cells[(pair, label)]["optim"]
            assert optim["epochs"] == (960 if pair == "resnet32x4-ShuffleV2" else 480), (pair, label)
            assert optim["milestones"] == [150, 180, 210] and cells[(pair, label)]["data"]["views"] == 2
            assert cells[(pair, label)]["distill"]["method"] == "mlkd"
    assert cells[("vgg13-vgg8", "mlkd-ls")]["distill"]["method_weight"] == 6.0
    assert cells[("resnet56-resnet20", "mlkd-ls")]["distill"]["method_weight"] == 9.0


@pytest.mark.parametrize("grid, label, component", [("ctkd", "ctkd", "ctkd"), ("dot", "kd-dot", "dot")])
def test_component_grids_switch_only_the_component_on(grid, label, component):
    cells = grid_cells(grid)
    for (pair, method), config in cells.items():
        assert config["distill"]["method"] == "kd"
        assert config["components"] == ({component: True} if method == label else {}), (pair, method)
        # KD as the CTKD and DOT scripts run it: CE 0.1 / KD 0.9 (the distiller's defaults), T 4.
        assert config["distill"].get("ce_weight") in (None, 0.1)


@pytest.mark.slow  # plans 1,359 cells (12 s)
def test_adaptive_logit_crosses_every_new_method_with_every_strategy():
    cells = grid_cells("adaptive-logit")
    methods = {coords[1] for coords in cells}
    strategies = {coords[2] for coords in cells}
    assert {"dist", "nkd", "wsld", "ttm", "wttm", "mlkd", "kd-ls", "dkd-ls", "ctkd", "kd-dot"} <= methods
    assert strategies == {"standard", "sakd", "abl"}


def test_a_plan_written_before_components_existed_is_unchanged():
    from adakd.engine.config import resolve, to_dict
    from adakd.experiments.sweep import config_changes

    new = to_dict(resolve(["cifar100"]))
    old = {k: v for k, v in new.items() if k != "components"}
    assert config_changes(old, new) == []
    switched = {**new, "components": {"ctkd": True}}
    assert config_changes(old, switched) == ["components.ctkd: None -> True"]


def test_a_cell_s_teacher_and_student_baseline_train_without_its_components():
    label, source = load_grid("ctkd")
    cells = plan(source, label, Path("/nonexistent/ctkd"), check_teachers=False)
    alone = [c for c in cells if c.role in ("teacher", "student")]
    assert alone and all(c.config["components"] == {} for c in alone)


@pytest.mark.slow  # plans ls-table's 342 cells
def test_ls_table_trains_each_teacher_once_on_the_240_epoch_one_view_recipe():
    teachers = [c for c in planned("ls-table") if c.role == "teacher"]
    assert sorted(c.config["model"]["name"] for c in teachers) == sorted(
        ["resnet32x4", "vgg13", "wrn_40_2", "resnet56", "resnet110", "ResNet50"])
    for teacher in teachers:
        assert teacher.config["optim"]["epochs"] == 240 and teacher.config["optim"]["milestones"] == [150, 180, 210]
        assert teacher.config["data"]["views"] == 1 and teacher.config["components"] == {}
