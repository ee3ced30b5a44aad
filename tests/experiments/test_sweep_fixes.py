"""Sweep fixes of issue 18: teachers resolved like `adakd train`, teacher files checked with the plan, one sweep
per folder at a time, settings that do not change results, and dead ends that name their way out."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from adakd import models
from adakd.cli import main
from adakd.engine.config import resolve
from adakd.experiments.launch import prepare
from adakd.experiments.sweep import Sweep, load_grid, plan
from adakd.experiments.sweep_lock import SweepBusyError, SweepLock
from cli_checks import fails
from tiny_run import save_random_teacher


def teacher_cells(cells):
    return [c for c in cells if c.role == "teacher"]


def test_teacher_overrides_epochs_rescale_the_recipe_like_adakd_train(tmp_path):
    """Students for 2 epochs, their teacher for 10: the teacher's milestones are the demo recipe's [20, 27] of 30
    epochs scaled to 10 (what `adakd train --preset demo epochs=10` gives), not the students' [1, 2] kept."""
    grid = {"presets": ["cifar100", "demo"], "overrides": {"epochs": 2, "model.name": "resnet8",
                                                           "teacher.name": "resnet20"},
            "axes": {"method": ["kd"]}, "teacher_overrides": {"epochs": 10, "model.in_chans": 3}}
    cells = plan(grid, "g", tmp_path)
    (teacher,) = teacher_cells(cells)
    student = next(c for c in cells if c.role == "cell")
    expected = resolve(["cifar100", "demo"], None, ["epochs=10"]).optim.milestones
    assert teacher.config["optim"]["epochs"] == 10
    assert teacher.config["optim"]["milestones"] == list(expected) == [7, 9]  # 20 * 10/30, 27 * 10/30
    assert student.config["optim"]["milestones"] == [1, 2]
    assert teacher.config["model"]["name"] == "resnet20" and teacher.config["model"]["in_chans"] == 3


def test_teacher_milestones_given_with_the_students_epochs_are_rescaled_to_the_teachers(tmp_path):
    """Milestones written for the grid's 8 epochs scale to the teacher's 12, as `--config grid.yaml epochs=12`."""
    grid = {"presets": ["cifar100", "demo"], "overrides": {"epochs": 8, "optim.milestones": [4, 6],
                                                           "model.name": "resnet8", "teacher.name": "resnet20"},
            "axes": {"method": ["kd"]}, "teacher_overrides": {"epochs": 12}}
    (teacher,) = teacher_cells(plan(grid, "g", tmp_path))
    assert teacher.config["optim"]["milestones"] == [6, 9]  # 4 * 12/8, 6 * 12/8


def test_the_sweeps_command_line_is_the_top_layer_for_students_and_teachers(tmp_path):
    """`adakd sweep GRID epochs=4`: every cell, the teacher too, runs 4 epochs, and milestones the grid wrote for its
    8 epochs scale to 4 (the grid is a layer like a --config file, the command line one above it)."""
    grid = {"presets": ["cifar100", "demo"], "overrides": {"epochs": 8, "optim.milestones": [4, 6],
                                                           "model.name": "resnet8", "teacher.name": "resnet20"},
            "axes": {"method": ["kd"]}, "teacher_overrides": {"epochs": 12}}
    cells = plan(grid, "g", tmp_path, overrides=["epochs=4"])
    assert {c.role: c.config["optim"]["milestones"] for c in cells} == {"teacher": [2, 3], "cell": [2, 3]}
    assert all(c.config["optim"]["epochs"] == 4 for c in cells)


def test_shipped_fmnist_study_teacher_decays_on_its_own_schedule(tmp_path):
    label, grid = load_grid("fmnist-study")
    teachers = teacher_cells(plan(grid, label, tmp_path))
    assert teachers and all(t.config["optim"]["epochs"] == 10 for t in teachers)
    # 150, 180, 210 of 240 scaled to 10 epochs; before the fix it kept the students' [13, 15, 18] of 20 epochs, so it
    # never decayed (the study's earlier 12-epoch teacher got the 8-epoch students' [5, 6, 7]: lr 5e-5 from epoch 8).
    assert all(t.config["optim"]["milestones"] == [6, 8, 9] for t in teachers)
    assert all(t.config["data"]["train_size"] == 30000 for t in teachers)


# ---- a tiny grid: one distill cell taught by a given teacher, or one cell trained alone

TINY = {"presets": ["cifar100", "demo"],
        "overrides": {"epochs": 1, "data.train_size": 64, "data.image_size": 8, "log.tensorboard": False,
                      "model.name": "resnet8", "teacher.name": "resnet8"},
        "axes": {"method": ["kd"]}, "teachers": {"resnet8": "required"}}
ALONE = {**TINY, "overrides": {**TINY["overrides"], "task": "train"}, "teachers": {}}


def write(path, grid):
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


def state_dict_file(path, name="resnet8"):
    return save_random_teacher(path, name)




class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_teacher_is_refused_with_the_plan_and_nothing_is_written(tmp_path, capsys):
    grid, out = write(tmp_path / "g.yaml", TINY), tmp_path / "sweep"
    fails(capsys, ["sweep", grid, "--out", str(out), "--teacher", f"resnet8={tmp_path / 'none.pth'}"],
                   "teacher resnet8", "does not exist", "--teacher resnet8=PATH")
    wrong = state_dict_file(tmp_path / "resnet20.pth", "resnet20")
    fails(capsys, ["sweep", grid, "--out", str(out), "--teacher", f"resnet8={wrong}"],
                   "teacher resnet8", "needed by cell method-kd_seed0")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": models.create("resnet8", num_classes=10).state_dict(), "x": Evil(marker)}, evil)
    fails(capsys, ["sweep", grid, "--out", str(out), "--teacher", f"resnet8={evil}"], "refusing to load")
    assert not marker.exists() and not out.exists()


@pytest.mark.slow  # a real sweep, run twice
def test_a_failed_cell_whose_teacher_path_was_fixed_starts_again(tmp_path, capsys):
    """Cells that failed on a wrong teacher (as before the plan checked teachers): a re-run with the corrected
    --teacher restarts them instead of listing the old failures."""
    grid, out = write(tmp_path / "g.yaml", TINY), tmp_path / "sweep"
    old = state_dict_file(tmp_path / "old.pth")
    sweep, cells, label, given = prepare(grid, [], out, {"resnet8": str(old)})
    sweep.write_plan(label, given["source"], given["overrides"], given["teachers"], cells)
    (cell,) = cells
    sweep.cell_dir(cell.name).mkdir(parents=True)
    sweep.set_state(cell.name, "failed", error="CheckpointError: teacher file refused")
    new = state_dict_file(tmp_path / "new.pth")
    assert main(["sweep", grid, "--out", str(out), "--teacher", f"resnet8={new}"]) == 0
    assert "starts again" in capsys.readouterr().out
    assert Sweep(out).state(cell)["state"] == "done"
    saved = yaml.safe_load((out / "cells" / cell.name / "config.yaml").read_text())
    assert saved["teacher"]["weights"] == str(new)
    assert len(list((out / "failed").iterdir())) == 1  # the failed attempt is kept, not deleted


def test_threads_and_log_settings_do_not_count_as_config_changes(tmp_path):
    grid, out = write(tmp_path / "g.yaml", ALONE), tmp_path / "sweep"
    sweep, cells, label, given = prepare(grid, [], out)
    sweep.write_plan(label, given["source"], given["overrides"], given["teachers"], cells)
    sweep.cell_dir(cells[0].name).mkdir(parents=True)  # started
    _, changed, _, _ = prepare(grid, ["threads=1", "data.num_workers=2", "log.progress=false", "log.eval_every=3",
                                      "data.download=false", "data.mirror=http://mirror.local/data/"], out)
    assert sweep.check_unchanged(changed) == []
    _, changed, _, _ = prepare(grid, ["optim.lr=0.2"], out)
    with pytest.raises(Exception, match="optim.lr: 0.05 -> 0.2"):
        sweep.check_unchanged(changed)


def test_table_of_a_sweep_with_a_cut_manifest_says_how_to_rebuild_it(tmp_path, capsys):
    grid, out = write(tmp_path / "g.yaml", ALONE), tmp_path / "sweep"
    sweep, cells, label, given = prepare(grid, [], out)
    sweep.write_plan(label, given["source"], given["overrides"], given["teachers"], cells)
    text = sweep.manifest.read_text()
    sweep.manifest.write_text(text[: text.index("cells:")])
    fails(capsys, ["table", str(out)], "sweep.yaml lacks cells", f"adakd sweep GRID --out {out}")
    sweep.manifest.write_text(text[: len(text) // 3] + "\n  - [unclosed")
    fails(capsys, ["table", str(out)], "sweep.yaml", "rebuild it")


# ---- one sweep per folder

HOLD = ("import sys, time\nfrom adakd.experiments.sweep_lock import SweepLock\n"
        "with SweepLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """Another `adakd sweep` process holding tmp_path/sweep."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "sweep")], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_a_second_sweep_on_a_busy_folder_names_the_holder_and_runs_nothing(tmp_path, capsys, holder):
    grid, out = write(tmp_path / "g.yaml", ALONE), tmp_path / "sweep"
    line = fails(capsys, ["sweep", grid, "--out", str(out)], f"in use by PID {holder.pid} on ", " since ",
                          "--wait")
    assert "sweep.yaml" not in os.listdir(out) and not (out / "cells").exists(), line


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_wait_starts_when_the_holder_ends(tmp_path, holder):
    acquired = threading.Event()
    messages = []

    def wait_for_lock():
        with SweepLock(tmp_path / "sweep", wait=True, poll_s=0.05, on_wait=messages.append):
            acquired.set()

    waiter = threading.Thread(target=wait_for_lock)
    waiter.start()
    time.sleep(0.5)
    assert not acquired.is_set() and f"PID {holder.pid}" in messages[0]
    holder.send_signal(signal.SIGKILL)  # a killed holder releases its lock with its process
    waiter.join(timeout=10)
    assert acquired.is_set()


def test_a_lock_file_left_by_a_dead_sweep_is_taken_over(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.lock").write_text("pid=999999 host=elsewhere since=2026-01-01T00:00:00\n")
    with SweepLock(folder):
        assert f"pid={os.getpid()} " in (folder / "sweep.lock").read_text()
        with pytest.raises(SweepBusyError, match=f"in use by PID {os.getpid()}"):
            with SweepLock(folder):  # a second holder, even in this process, is refused
                pass


# ---- a cell whose last.pth is cut

@pytest.mark.slow
def test_a_cell_with_a_truncated_last_checkpoint_restarts_with_retry_failed(tmp_path, capsys):
    grid, out = write(tmp_path / "g.yaml", ALONE), tmp_path / "sweep"
    assert main(["sweep", grid, "--out", str(out)]) == 0
    (cell,) = Sweep(out).cells()
    folder = out / "cells" / cell.name
    (folder / "summary.json").unlink()  # as if killed after its checkpoint, with last.pth cut by a full disk
    data = (folder / "last.pth").read_bytes()
    (folder / "last.pth").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["sweep", grid, "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "last.pth cannot be read" in text and "restarts from epoch 1" in text
    assert main(["sweep", grid, "--out", str(out), "--retry-failed"]) == 0
    assert "restarts from epoch 1" in capsys.readouterr().out
    assert Sweep(out).state(cell)["state"] == "done"
    (moved,) = (out / "failed").iterdir()
    assert (moved / cell.name / "best.pth").is_file()


def test_top5_table_of_runs_that_measured_no_top5_is_one_line(tmp_path, capsys):
    """Runs of 5 classes or fewer log no top-5 (summary last_acc5 null): `--topk 5` says so instead of a table of
    states."""
    import json

    grid, out = write(tmp_path / "g.yaml", ALONE), tmp_path / "sweep"
    sweep, cells, label, given = prepare(grid, [], out)
    sweep.write_plan(label, given["source"], given["overrides"], given["teachers"], cells)
    folder = sweep.cell_dir(cells[0].name)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"last_acc1": 80.0, "last_acc5": None, "best_acc1": 81.0,
                                                     "best_acc5": None}))
    assert main(["table", str(out)]) == 0 and "| kd | 80.00 |" in capsys.readouterr().out
    fails(capsys, ["table", str(out), "--topk", "5"], "measured no top-5", "--topk 1")
