"""The demo end to end (shortened): three runs, one table, nothing downloaded."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from adakd.demo import run_demo


@pytest.mark.slow
def test_demo_prints_the_five_row_table(tmp_path):
    table, failed = run_demo(tmp_path, ["optim.epochs=2", "data.image_size=8", "log.tensorboard=false"], quiet=True,
                             seeds=2)
    assert failed == 0
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["teacher", "student", "KD", "KD + SAKD", "KD + ABL"]
    accuracies = [float(re.search(r"\| (\d+\.\d+) ±", row).group(1)) for row in rows]
    assert len(accuracies) == 5 and all(0 <= a <= 100 for a in accuracies)
    assert all("(Δ " in row for row in rows[3:])  # the adaptive rows show their paired difference to KD
    (demo_dir,) = tmp_path.iterdir()
    cells = {p.name for p in (demo_dir / "cells").iterdir()}
    assert cells == {f"{run}_seed{seed}" for seed in (0, 1) for run in (
        "teacher-resnet20", "student-resnet8", "method-kd_strategy-standard", "method-kd_strategy-sakd",
        "method-kd_strategy-abl")}
    # ABL cells ran both stages, the search scaled down by search_scale.
    assert (demo_dir / "cells" / "method-kd_strategy-abl_seed1" / "search" / "gamma.json").is_file()
    assert (demo_dir / "cells" / "method-kd_strategy-abl_seed1" / "final_seed1" / "last.pth").is_file()


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "adakd", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and re.match(r"\d+\.\d+", result.stdout)
