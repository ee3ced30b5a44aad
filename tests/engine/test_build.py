"""build_run: training, eval, export and the benchmarks build a run's parts through one builder, in one order."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adakd.engine.build import build_run
from adakd.engine.config import ConfigError, resolve
from adakd.engine.trainer import Trainer, seed_everything
from adakd.models.checkpoint import CheckpointError

TINY = ["data.train_size=64", "data.image_size=8", "data.num_workers=0", "model.name=resnet8", "optim.epochs=1",
        "optim.milestones=[]", "log.progress=false", "log.tensorboard=false", "threads=1", "device=cpu"]


def test_eval_parts_build_the_test_split_and_the_student_without_its_start_weights(tmp_path: Path) -> None:
    missing = tmp_path / "gone.pth"
    config = resolve(["demo"], None, [*TINY, f"model.weights={missing}"])

    run = build_run(config, parts=("test", "student"), start_weights=())

    assert run.train_set is None and run.teacher is None and run.strategy is None and run.batch is None
    assert run.num_classes == 10 and run.input_shape == (3, 8, 8)  # the digits, resized to 8
    assert run.student.model.fc.out_features == 10
    with pytest.raises(CheckpointError, match="gone.pth"):  # the student's start weights are read only
        build_run(config, parts=("test", "student"))  # when asked for


def test_trainer_builds_its_run_in_build_runs_order(tmp_path: Path) -> None:
    config = resolve(["demo"], None, [*TINY, f"out_dir={tmp_path}", "name=r"])
    trainer = Trainer(config)
    trainer.run.close()
    seed_everything(config.seed, config.deterministic)

    run = build_run(config)

    assert trainer.built.student is trainer.student and trainer.built.strategy is trainer.strategy
    # The trainer's parts are build_run's: from the same seed, the same student.
    for key, value in run.student.model.state_dict().items():
        assert torch.equal(value, trainer.student.model.state_dict()[key]), key
    assert run.input_shape == trainer.input_shape and run.batch == trainer.batch == 64
    assert len(run.train_set) == len(trainer.train_set) == 64


def test_a_distilled_run_without_start_weights_needs_no_teacher_file() -> None:
    # What export and the benchmarks build: the teacher's network for its size, the distiller and the strategy.
    config = resolve(["demo"], None, [*TINY, "task=distill", "teacher.name=resnet20", "distill.method=at"])

    run = build_run(config, parts=("student", "teacher", "distiller", "strategy"), start_weights=(),
                    num_classes=10, input_shape=(3, 8, 8), train_targets=torch.arange(40) % 10)

    assert not run.teacher_is_trained and not any(p.requires_grad for p in run.teacher.parameters())
    assert run.strategy.teacher is run.teacher and run.distiller is not None and run.student_spots
    with pytest.raises(ConfigError, match="teacher.weights is required"):  # as training: a random teacher
        build_run(config, parts=("student", "teacher"), num_classes=10, input_shape=(3, 8, 8))
