"""Run folders written before issue 20's refactor resume after it, to the weights the old code reached.

tests/fixtures/pre_refactor_runs/ holds a plain KD run and a SAKD run made by commit 363e094 and stopped after
epoch 1 of 2, with the student weights of the same runs made uninterrupted by that code (README.txt there says
how). `adakd distill --resume` with today's code must finish epoch 2 and land on those weights bit for bit.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_refactor_runs"


@pytest.fixture
def old_runs(tmp_path: Path) -> Path:
    """A private copy of the fixture folder: a resume writes into its run folder."""
    copy = tmp_path / "pre_refactor_runs"
    shutil.copytree(FIXTURES, copy)
    return copy


@pytest.mark.slow  # a separate process per run (its deterministic=true and threads=1 stay out of this one)
@pytest.mark.parametrize("name", ["kd", "sakd"])
def test_a_run_stopped_by_the_old_code_resumes_to_its_uninterrupted_weights(old_runs: Path, name: str):
    """Epoch 2 resumed from the old last.pth equals the old code's straight 2-epoch run in every student tensor."""
    before = torch.load(old_runs / name / "last.pth", map_location="cpu", weights_only=True)
    assert before["epoch"] == 1  # the fixture is what it claims to be: stopped after epoch 1 of 2
    # From inside the copy: the old config names the teacher relative to it (teacher.weights=teacher.pth).
    done = subprocess.run([sys.executable, "-m", "adakd", "distill", "--resume", name], cwd=old_runs,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed after epoch 1" in (old_runs / name / "log.txt").read_text()

    final = torch.load(old_runs / name / "last.pth", map_location="cpu", weights_only=True)
    expected = torch.load(old_runs / f"{name}.expected.pth", map_location="cpu", weights_only=True)
    assert final["epoch"] == 2
    assert list(final["model"]) == list(expected)  # state_dict keys and their order unchanged
    # Bit for bit under the torch release that made the fixtures; another release may pick other CPU kernels and
    # round differently, so there the weights must agree to float32 noise (a changed loss or RNG order moves them
    # by far more: one SGD step at lr 0.05 changes weights by ~1e-3).
    made_with = json.loads((old_runs / name / "meta.json").read_text())["torch_version"].split("+")[0]
    bitwise = torch.__version__.split("+")[0] == made_with

    def same(got: torch.Tensor, want: torch.Tensor) -> bool:
        if got.dtype != want.dtype:
            return False
        if bitwise or not want.is_floating_point():
            return torch.equal(got, want)
        return torch.allclose(got, want, rtol=1e-4, atol=1e-6)

    differing = [key for key, value in expected.items() if not same(final["model"][key], value)]
    assert not differing, (f"{len(differing)} of {len(expected)} student tensors differ "
                           f"({'bitwise' if bitwise else 'beyond float32 noise'}; fixtures made with torch "
                           f"{made_with}), first: {differing[:3]}")
    epochs = [row["epoch"] for row in csv.DictReader(open(old_runs / name / "metrics.csv"))]
    assert epochs == ["1", "2"]  # the old epoch-1 row kept, epoch 2 appended once
