"""Build a distiller for a teacher-student pair from shapes measured on the two staged networks."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from adakd.distillers.base import BODY_STAGES, DistillContext, Distiller, build_config, resolve_spots, spot_name
from adakd.distillers.registry import get
from adakd.models.staged import StagedModel


def create(
    name: str,
    student: StagedModel,
    teacher: StagedModel,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    spots: Sequence[int | str] | None = None,
    context: DistillContext | None = None,
    **args: Any,
) -> tuple[Distiller, list[int], list[int]]:
    """Return (distiller, student spot indices, teacher spot indices); `args` are the method's hyper-parameters.

    Raises ValueError naming the problem when the pair or the arguments do not fit the method.
    """
    cls = get(name)
    spots = tuple(spots or cls.defaults.spots)
    if BODY_STAGES in spots and student.num_stages != teacher.num_stages:
        raise ValueError(f"{name} distills every body stage, but the student has {student.num_stages - 3} and the "
                         f"teacher {teacher.num_stages - 3}; give matching spots (distill.spots)")
    student_spots = resolve_spots(spots, student.num_stages)
    teacher_spots = resolve_spots(spots, teacher.num_stages)
    student_shapes = student.feature_shapes(input_shape)
    teacher_shapes = teacher.feature_shapes(input_shape)
    if context is None:
        context = DistillContext(num_classes=student_shapes[-1][0], train_targets=torch.zeros(0, dtype=torch.long))
    hparams = build_config(cls.config_class, args, "distill.args") if dataclasses.is_dataclass(cls.config_class) \
        else None
    distiller = cls(
        [spot_name(student.stage_names, k) for k in student_spots],
        [student_shapes[k] for k in student_spots],
        [teacher_shapes[k] for k in teacher_spots],
        hparams,
        context,
    )
    return distiller, student_spots, teacher_spots
