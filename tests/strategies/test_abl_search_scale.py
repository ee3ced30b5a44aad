"""ABL's search sized to its run: search_scale=auto, the floor on gamma updates, the cap on meta_lr, the warning when
a forced scale or count is degenerate, and what `adakd abl` runs and prints on a tiny subset (issue #18, item 3)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from adakd.cli import main
from adakd.experiments.pipeline import stage_configs
from adakd.engine.config import from_dict, resolve
from adakd.experiments.sweep import load_grid
from adakd.engine.trainer import Trainer
from adakd.strategies.abl_options import META_LR_CAP, META_STEPS_FLOOR, PAPER_RUN_STEPS, ABLOptions
from adakd.strategies.abl_search import configured_warm_steps, search_warning, steps_budget
from engine.test_abl_runs import teacher_file  # tests/engine, through the rootdir on sys.path

# 160 digits, batch 64, 5 epochs: the final run has 5 x ceil(160 / 64) = 15 steps, the search trains on 80 images.
TINY = ["data.image_size=8", "data.train_size=160", "data.batch_size=64", "optim.epochs=5", "log.progress=false",
        "log.tensorboard=false", "deterministic=true", "task=distill", "model.name=resnet8", "teacher.name=resnet8",
        "threads=1"]
PAPER = {"warm_steps": 40_000, "meta_steps": 10_000, "meta_lr": 3e-4, "early_stop_window": 2_000, "log_every": 100}


def config(tmp_path, *overrides, presets=("cifar100", "demo"), name="run"):
    return resolve(list(presets), overrides=[f"out_dir={tmp_path}", f"name={name}", *TINY,
                                             f"teacher.weights={teacher_file(tmp_path)}", *overrides])


def counts(opts: ABLOptions) -> dict:
    return {name: getattr(opts, name) for name in PAPER}


def test_auto_is_the_final_runs_steps_over_the_papers_computed_by_hand():
    opts = ABLOptions(run_steps=1_000)  # the Fashion-MNIST study: 8 epochs x 125 batches
    assert opts.search_plan["scale"] == 1_000 / 187_680
    # 40,000 x 0.005328 = 213.1; 10,000 x 0.005328 = 53.3; the window is a fifth of the updates, a row per 100th.
    assert counts(opts) == {"warm_steps": 213, "meta_steps": 53, "meta_lr": 3.0 / 53, "early_stop_window": 11,
                            "log_every": 1}
    assert steps_budget(opts) == 266


def test_auto_takes_the_run_length_from_data_size_batch_and_epochs(tmp_path):
    trainer = Trainer(config(tmp_path, "strategy=abl-search"))
    plan = trainer.strategy.options.search_plan
    assert plan["search_scale"] == "auto" and plan["run_steps"] == 5 * math.ceil(160 / 64) == 15
    assert plan["scale"] == 15 / 187_680
    opts = trainer.strategy.options
    # round(40,000 x 15 / 187,680) = 3 warm-start steps; 10,000 x S = 0.8 gamma updates, lifted to the floor.
    assert (opts.warm_steps, opts.meta_steps, opts.meta_lr) == (3, 50, 0.06)
    # 53 steps on the 80-image search half (2 batches an epoch): 27 epochs, where the paper's counts made 25,000.
    assert len(trainer.train_loader) == 2 and trainer.epochs == 27


@pytest.mark.parametrize("run_steps", [1, 15, 150, 937, 2_000, 50_000])
def test_floor_and_cap_hold_and_keep_the_papers_gamma_travel(run_steps):
    opts = ABLOptions(run_steps=run_steps)
    assert opts.meta_steps >= META_STEPS_FLOOR == 50
    assert opts.meta_lr <= META_LR_CAP == 0.06
    assert opts.meta_lr * opts.meta_steps == pytest.approx(3e-4 * 10_000)  # how far Adam can move gamma
    assert opts.meta_steps == max(50, round(10_000 * run_steps / 187_680))
    assert search_warning(opts) is None


def test_the_papers_recipe_and_longer_runs_keep_the_papers_counts():
    cifar = 240 * math.ceil(50_000 / 64)  # the CIFAR-100 recipe: 240 epochs of 782 batches
    assert cifar == PAPER_RUN_STEPS
    assert counts(ABLOptions(run_steps=cifar)) == PAPER and ABLOptions(run_steps=cifar).search_plan["scale"] == 1.0
    imagenet = 100 * math.ceil(1_281_167 / 256)
    assert counts(ABLOptions(run_steps=imagenet)) == PAPER  # longer runs are not lengthened
    assert counts(ABLOptions()) == PAPER  # options built without a run


def test_the_paper_preset_keeps_absolute_counts_on_a_tiny_run(tmp_path):
    cfg = resolve(["pair-resnet56-resnet20", "abl"], None, ["method=at"])
    assert cfg.strategy.name == "abl" and cfg.strategy.args == {"search_scale": 1}
    _, grid = load_grid("abl-table8")  # the paper's table: the same absolute search
    assert grid["axes"]["strategy"]["abl"] == {"strategy": "abl", "strategy.args.search_scale": 1}
    # On 160 digits the search stage of `adakd abl --preset abl` still runs the paper's 40k + 10k steps.
    root = tmp_path / "pipe"
    (_, search), *_ = stage_configs(config(tmp_path, "strategy=abl", presets=("cifar100", "demo", "abl")), root, [0])
    trainer = Trainer(from_dict(search))
    assert trainer.strategy.options.search_plan["run_steps"] == 15
    assert counts(trainer.strategy.options) == PAPER
    assert trainer.epochs == math.ceil(50_000 / len(trainer.train_loader))
    assert trainer.strategy.start_notices() == [(trainer.strategy.start_notices()[0][0], False)]  # no warning: chosen on purpose


def test_a_forced_degenerate_scale_warns_naming_value_floor_and_cap():
    opts = ABLOptions(search_scale=0.00008)  # the README's old rule for 15 steps: one update at meta_lr 3.75
    assert (opts.meta_steps, opts.meta_lr) == (1, pytest.approx(3.75))
    text = search_warning(opts)
    for fragment in ("search_scale=8e-05", "1 gamma update(s) (floor 50)", "meta_lr 3.75 (cap 0.06)",
                     "search_scale at auto"):
        assert fragment in text
    assert "meta_steps=6" in search_warning(ABLOptions(meta_steps=6, run_steps=15))  # a forced count
    assert "meta_lr=0.5" in search_warning(ABLOptions(meta_lr=0.5, run_steps=15))
    assert search_warning(ABLOptions(search_scale=0.00533)) is None  # the Fashion-MNIST study's scale is fine


def test_a_forced_degenerate_scale_prints_one_warning_line(tmp_path, capsys):
    trainer = Trainer(config(tmp_path, "strategy=abl-search", "strategy.args.search_scale=0.00008"))
    assert trainer.epochs == 2  # 3 warm + 1 meta step
    trainer.fit()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "ABL search" in line]
    assert len(lines) == 1 and lines[0].startswith("adakd: warning: ABL search: with search_scale=8e-05")
    assert lines[0] in (tmp_path / "run" / "log.txt").read_text()
    auto = Trainer(config(tmp_path, "strategy=abl-search", name="auto"))
    assert [warning for _, warning in auto.strategy.start_notices()] == [False]  # auto: the description, no warning


def test_adakd_abl_on_a_tiny_subset_runs_a_bounded_search_and_records_it(tmp_path, capsys):
    argv = ["abl", "--preset", "demo", f"out_dir={tmp_path}", "name=pipe", *TINY,
            f"teacher.weights={teacher_file(tmp_path)}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    root = tmp_path / "pipe"
    log = (root / "search" / "log.txt").read_text()
    assert "lr schedule over 27 epochs" in log  # was "lr schedule over 25000 epochs"
    assert ("ABL search: search_scale=auto, S = 7.99e-05 (a final run of 15 steps, the paper's 187,680): 3 "
            "warm-start steps, then up to 50 gamma updates (the floor) at meta_lr 0.06 (the cap)") in log
    assert "lr schedule over 5 epochs" in (root / "final_seed0" / "log.txt").read_text()
    gamma = json.loads((root / "search" / "gamma.json").read_text())
    assert gamma["search"] == {"search_scale": "auto", "scale": 15 / 187_680, "run_steps": 15,
                               "paper_run_steps": 187_680, "warm_steps": 3, "meta_steps": 50, "meta_every": 1,
                               "meta_lr": 0.06, "early_stop_window": 10, "log_every": 1, "meta_steps_floor": 50,
                               "meta_lr_cap": 0.06}
    epochs = len((root / "search" / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= epochs <= 27 and 1 <= gamma["meta_steps"] <= 50
    assert f"({gamma['meta_steps']}" in out and "of up to 50 gamma updates at meta_lr 0.06, search_scale auto" in out
    # The search figure's warm-start band comes from what the search recorded (the config says only `auto`).
    assert configured_warm_steps(root / "search") == 3


def test_search_scale_must_be_a_number_or_auto(tmp_path, capsys):
    argv = ["distill", "--preset", "demo", f"out_dir={tmp_path / 'runs'}", *TINY,
            f"teacher.weights={teacher_file(tmp_path)}", "strategy=abl-search", "strategy.args.search_scale=fast"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "adakd: error: strategy.args: search_scale must be > 0 or auto, got 'fast'"
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="warm_steps must be a whole number >= 0, got 'many'"):
        ABLOptions(warm_steps="many")


def test_a_copy_keeps_the_resolved_search():
    import dataclasses

    opts = ABLOptions(run_steps=15)
    assert dataclasses.replace(opts) == opts and dataclasses.replace(opts).search_plan == opts.search_plan
    assert yaml.safe_load(yaml.safe_dump(opts.search_plan))["scale"] == opts.search_plan["scale"]
