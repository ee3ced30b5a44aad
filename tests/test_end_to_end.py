"""The demo end to end (shortened): three runs, one table, nothing downloaded."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from adakd.experiments.demo import run_demo


@pytest.mark.slow
def test_demo_prints_the_five_row_table(tmp_path):
    table, failed = run_demo(tmp_path, ["optim.epochs=2", "data.image_size=8", "log.tensorboard=false"], quiet=True,
                             seeds=2)
    assert failed == 0
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["teacher", "student", "KD", "KD + SAKD", "KD + ABL"]
    accuracies = [float(re.search(r"\| (\d+\.\d+)", row).group(1)) for row in rows]  # one teacher: no ±
    assert len(accuracies) == 5 and all(0 <= a <= 100 for a in accuracies)
    assert all("(Δ " in row for row in rows[3:])  # the adaptive rows show their paired difference to KD
    (demo_dir,) = tmp_path.iterdir()
    cells = {p.name for p in (demo_dir / "cells").iterdir()}
    assert cells == {"teacher-resnet20_seed0"} | {f"{run}_seed{seed}" for seed in (0, 1) for run in (
        "student-resnet8", "method-kd_strategy-standard", "method-kd_strategy-sakd", "method-kd_strategy-abl")}
    # One teacher on the whole training split (1,437 images), the students on 100 of them.
    teacher = yaml.safe_load((demo_dir / "cells" / "teacher-resnet20_seed0" / "config.yaml").read_text())
    student = yaml.safe_load((demo_dir / "cells" / "student-resnet8_seed0" / "config.yaml").read_text())
    assert teacher["data"]["train_size"] is None and student["data"]["train_size"] == 100
    # ABL cells ran both stages, the search scaled to the run (search_scale=auto).
    assert (demo_dir / "cells" / "method-kd_strategy-abl_seed1" / "search" / "gamma.json").is_file()
    assert (demo_dir / "cells" / "method-kd_strategy-abl_seed1" / "final_seed1" / "last.pth").is_file()


def test_demo_says_what_it_runs_before_it_starts(tmp_path):
    """The header printed before the progress line: the teacher sees the whole training split, the students 100."""
    from adakd.experiments.demo import describe_demo

    text = describe_demo(tmp_path / "demo", [], seeds=3, jobs=2)
    assert "teacher  resnet20 (0.27 M parameters): all 1,437 training images, 20 epochs" in text
    assert "student  resnet8 (0.08 M parameters): 100 of those images, 30 epochs" in text
    assert "3 seed(s), 13 runs, 2 at a time, all tested on the 360 test images" in text
    assert not (tmp_path / "demo").exists()  # planning writes nothing


@pytest.mark.slow  # a separate process (or a real run) per check: CI runs it, the inner loop does not
def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "adakd", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and re.match(r"\d+\.\d+", result.stdout)
