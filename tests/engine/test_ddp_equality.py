"""Issue 6: a 2-process gloo run under torchrun gives the weights of one process with the same global batch.

Both ranks see, between them, exactly the samples and augmentation one process sees in each global batch (the
loader deals a global order out rank::world_size); DDP averages the per-rank mean gradients into the global-batch
mean; sync_bn=true makes BatchNorm's statistics those of the global batch (adakd's CPU SyncBatchNorm under gloo).
Without sync_bn the weights differ by ~5e-2 after 8 steps, so the 1e-5 bound below is a real test of SyncBN.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tiny_run import save_random_teacher

# DDP runs under torchrun: `python -m pytest -m "not slow"` (the inner loop) skips this file.
pytestmark = pytest.mark.slow

# DDP runs under torchrun; the inner loop `python -m pytest -m "not slow"` skips this file.
pytestmark = pytest.mark.slow

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
# 128 samples in global batches of 32 divide evenly over 2 ranks: no padding repeats a sample on one rank only.
COMMON = ["--preset", "demo", "model.name=resnet8", "data.image_size=8", "data.train_size=128",
          "data.batch_size=32", "optim.epochs=2", "deterministic=true", "sync_bn=true", "log.progress=false",
          "log.tensorboard=false"]


def run(args: list[str], nproc: int, port: int) -> None:
    """One `adakd` run: a plain process for nproc 1, torchrun with gloo ranks otherwise."""
    launcher = ([sys.executable, "-m", "adakd"] if nproc == 1 else
                [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(port), "-m", "adakd"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def one_and_two_processes(args: list[str], port: int, tmp_path) -> tuple[dict, dict]:
    """The last checkpoints of `args` run in one process and under two gloo ranks."""
    run(args + ["name=one"], nproc=1, port=0)
    run(args + ["name=two"], nproc=2, port=port)
    return tuple(torch.load(tmp_path / name / "last.pth", map_location="cpu", weights_only=True)
                 for name in ("one", "two"))


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest |a - b| over every tensor of two state dicts, and where it is."""
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("task", ["train", "distill", "abl", "abl-search", "sakd", "ctkd", "ab", "fsp"])
def test_two_gloo_ranks_give_the_weights_of_one_process(tmp_path, task):
    # ABL averages its hand-made gradients (and, in the search, the validation gradient) across ranks itself.
    strategy = {"abl": ["strategy=abl-fixed"],
                "abl-search": ["strategy=abl-search", "strategy.args.warm_steps=1", "strategy.args.meta_steps=3"],
                # SAKD's Gumbel noise is drawn for the global batch on every rank, each keeping its own rows.
                "sakd": ["strategy=sakd"],
                # CTKD's theta lives outside DDP: its gradient is averaged across ranks by the component itself.
                "ctkd": ["components.ctkd=true"],
                # AB's and FSP's stage trains the student's body outside DDP (its gradients averaged by the stage);
                # Each stage runs one epoch here. (SSKD has no row: its similarity rows compare a rank's copies with
                # that rank's upright images, a relational batch of B / ranks, so 2 ranks differ from 1 by design.)
                "ab": ["method=ab", "distill.method_weight=1", "distill.args.pretrain_epochs=1"],
                "fsp": ["method=fsp", "distill.method_weight=1", "distill.args.pretrain_epochs=1"],
                }.get(task, [])
    port = {"train": 29541, "distill": 29542, "abl": 29543, "abl-search": 29544, "sakd": 29545, "ctkd": 29548,
            "ab": 29549, "fsp": 29550}[task]
    task = "distill" if task != "train" else task
    args = [task, *COMMON, f"out_dir={tmp_path}"]
    if task == "distill":
        teacher = tmp_path / "resnet14_teacher.pth"
        save_random_teacher(teacher, "resnet14", epoch=240)
        # One epoch at lr 0.01: under a random teacher the student collapses (10% accuracy) and that regime amplifies
        # float32 summation-order noise from 2e-7 to 3e-5 within 4 steps at lr 0.05 and to 5e-5 in 8 at lr 0.01
        # (measured); 4 steps at lr 0.01 stay at float32 noise.
        args += ["teacher.name=resnet14", f"teacher.weights={teacher}", "method=kd", "distill.kl_weight=0.5",
                 "optim.lr=0.01", "optim.epochs=1"]
    args += strategy  # after the defaults above: a case's method= wins
    one, two = one_and_two_processes(args, port, tmp_path)
    # train: 2 epochs of 4 global batches; distill: 1 epoch; the ABL search: its 1 + 3 steps.
    assert one["step"] == two["step"] == (8 if task == "train" else 4)
    diff, where = max_abs_diff(one["model"], two["model"])
    print(f"{task}: max |1 process - 2 processes| = {diff:.3g} at {where}")
    assert diff <= 1e-5, (diff, where)
    if one["strategy"].get("distiller"):  # the distiller's parts (AB's connectors, none between equal widths)
        diff, where = max_abs_diff(one["strategy"]["distiller"], two["strategy"]["distiller"])
        assert diff <= 1e-5, (diff, where)
    if "components.ctkd=true" in strategy:
        thetas = [state["strategy"]["ctkd"]["theta"] for state in (one, two)]
        assert (thetas[0] - thetas[1]).abs().max() <= 1e-6 and thetas[0] != 1.0  # it learned, alike on both
    if "strategy=abl-search" in strategy:
        gammas = [state["strategy"]["gamma"] for state in (one, two)]
        assert (gammas[0] - gammas[1]).abs().max() <= 1e-6 and gammas[0].abs().max() > 0


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("task", ["train", "sakd"])
def test_accumulation_under_two_gloo_ranks_gives_the_weights_of_one_process(tmp_path, task):
    """optim.accumulate=2: the ranks skip DDP's all-reduce on a step's first micro-batch (no_sync) and all-reduce the
    sums on its last; SAKD's policy, outside DDP, is averaged once per step. Same weights as one process."""
    args = ["train" if task == "train" else "distill", *COMMON, f"out_dir={tmp_path}", "optim.accumulate=2"]
    if task == "sakd":
        teacher = tmp_path / "resnet14_teacher.pth"
        save_random_teacher(teacher, "resnet14", epoch=240)
        # 1 epoch at lr 0.01, as the distill case above: a collapsing student amplifies float32 noise at lr 0.05.
        args += ["strategy=sakd", "teacher.name=resnet14", f"teacher.weights={teacher}", "method=kd",
                 "distill.kl_weight=0.5", "optim.lr=0.01", "optim.epochs=1"]
    one, two = one_and_two_processes(args, {"train": 29546, "sakd": 29547}[task], tmp_path)
    # 4 micro-batches of 32 per epoch: 2 optimiser steps each.
    assert one["step"] == two["step"] == (8 if task == "train" else 4)
    diff, where = max_abs_diff(one["model"], two["model"])
    print(f"{task}, accumulate=2: max |1 process - 2 processes| = {diff:.3g} at {where}")
    assert diff <= 1e-5, (diff, where)
