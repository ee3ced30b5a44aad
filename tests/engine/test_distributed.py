"""DDP under torchrun on CPU (gloo): the run completes, only rank 0 writes, metrics cover every rank."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

from adakd import models

# DDP runs under torchrun; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_process_gloo_run(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "adakd", "train", "--preset", "demo",
            "model.name=resnet8", "data.image_size=8", "data.train_size=256", "data.batch_size=32", "optim.epochs=2",
            "log.progress=false", "log.tensorboard=false", f"out_dir={tmp_path}", "name=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("last epoch (2)") == 1  # only rank 0 prints the summary
    run = tmp_path / "ddp"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    state = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert state["step"] == 2 * 256 // 32  # steps count global batches: 8 per epoch on each rank
    model = models.create("resnet8", num_classes=10)
    model.load_state_dict(state["model"])  # no DDP 'module.' prefix in the saved student
    assert not any(name.startswith(".") for name in os.listdir(run) if name.endswith(".tmp"))


def test_frozen_teacher_is_never_wrapped_or_converted():
    from adakd.engine.distributed import DistInfo, wrap_student

    # sync_bn=true on CPU is adakd's own SyncBatchNorm now (tests/engine/test_sync_bn.py); a teacher stays as it is.
    two_cpu_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    teacher = models.frozen(models.create("resnet8"))
    assert wrap_student(teacher, two_cpu_ranks, sync_bn=True) is teacher
    assert type(teacher.model.bn1) is torch.nn.BatchNorm2d
