"""The benchmarks' --smoke modes run to the end on CPU and print their tables (seconds each)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the benchmarks: every method and step timed in subprocesses; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def smoke(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the rest of the suite runs
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def rows(output: str) -> dict[str, str]:
    """First word of each line -> the line."""
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_gpu_smoke_prints_every_step():
    output = smoke("gpu.py")
    header = next(line for line in output.splitlines() if line.startswith("step"))
    assert all(column in header for column in ("batch", "path", "ms/step", "images/s", "peak MiB", "syncs/step",
                                               "240 epochs"))
    table = rows(output)
    for name in ("KD", "AT", "CRD", "SAKD", "ABL"):
        assert name in table and float(table[name].split()[4]) > 0, name  # images/s of the CPU fp32 step
    for path in ("bf16+compile", "fp16+scaler", "bf16+channels_last", "bf16+nccl-ddp"):
        assert any(path in line and "skipped: no CUDA" in line for line in output.splitlines()), path
    assert "240 x ceil(50,000 / batch) x ms/step" in output and output.count("goal:") == 1


@pytest.mark.parametrize("script, columns", [("distillers.py", ("method", "ms/step", "images/s", "x KD")),
                                             ("abl.py", ("method", "KD ms", "ABL ms", "bilevel ms"))])
def test_step_benchmarks_smoke(script, columns):
    output = smoke(script)
    table = rows(output)
    assert all(column in table["method"] for column in columns)
    assert "kd" in table and float(table["kd"].split()[1]) > 0  # a measured step time
