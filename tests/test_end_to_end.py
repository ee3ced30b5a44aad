"""The demo end to end (shortened): three runs, one table, nothing downloaded."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from adakd.demo import run_demo


@pytest.mark.slow
def test_demo_prints_the_three_row_table(tmp_path):
    table = run_demo(tmp_path, ["optim.epochs=2", "data.image_size=8", "log.tensorboard=false"], quiet=True, seeds=2)
    rows = [line for line in table.splitlines() if line.startswith(("teacher", "student"))]
    assert len(rows) == 3
    assert rows[0].startswith("teacher resnet20") and "+ KD" in rows[2]
    accuracies = [float(a) for a in re.findall(r"([\d.]+)%", "\n".join(rows))]
    assert len(accuracies) == 6 and all(0 <= a <= 100 for a in accuracies)
    (demo_dir,) = tmp_path.iterdir()
    expected = {f"{run}_seed{seed}" for run in ("teacher", "student", "student_kd") for seed in (0, 1)}
    assert {p.name for p in demo_dir.iterdir()} == expected
    assert (demo_dir / "student_kd_seed1" / "last.pth").is_file()
    assert "±" in table


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "adakd", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and re.match(r"\d+\.\d+", result.stdout)
