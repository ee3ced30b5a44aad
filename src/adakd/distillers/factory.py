"""Build a distiller for a teacher-student pair from shapes measured on the two staged networks."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

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
    on_pairing: Callable[[str], None] | None = None,
    **args: Any,
) -> tuple[Distiller, list[int], list[int]]:
    """Return (distiller, student spot indices, teacher spot indices); `args` are the method's hyper-parameters.

    The "stages" spot pairs body stage k with body stage k when both networks have as many; otherwise each
    student stage with the teacher stage of the same spatial size (`pair_stages_by_size`), and `on_pairing` gets one
    line saying which. Raises ValueError naming the problem when the pair or the arguments do not fit the method.
    """
    cls = get(name)
    spots = tuple(spots or cls.defaults.spots)
    require_preacts(name, cls, student, teacher)
    student_shapes = student.feature_shapes(input_shape)
    teacher_shapes = teacher.feature_shapes(input_shape)
    if BODY_STAGES in spots and student.num_stages != teacher.num_stages:
        if getattr(cls, "needs_equal_stage_counts", False):
            raise ValueError(f"{name} relates consecutive stages within each network, so both need as many body "
                             f"stages; the student has {student.num_stages - 3} and the teacher "
                             f"{teacher.num_stages - 3} (the CRD benchmark runs {name} only between networks of one "
                             "architecture); choose such a pair, or give both networks' stage indices in "
                             "distill.spots")
        pairs = pair_stages_by_size(student_shapes, teacher_shapes)
        if not pairs:
            raise ValueError(f"{name} distills every body stage; the student has {student.num_stages - 3} and the "
                             f"teacher {teacher.num_stages - 3}, so stages are paired by spatial size, but none match "
                             f"at input {'x'.join(map(str, input_shape))}: student "
                             f"{stage_list(student, student_shapes)}; teacher {stage_list(teacher, teacher_shapes)}; "
                             "give the stage indices to read from "
                             "both networks in distill.spots (e.g. distill.spots=[1,2]) or pick a teacher whose stages "
                             "reach the student's sizes")
        if on_pairing is not None:
            on_pairing(pairing_text(name, student, teacher, student_shapes, pairs))
        student_spots, teacher_spots = [], []
        for spot in spots:
            if spot == BODY_STAGES:
                student_spots += [s for s, _ in pairs]
                teacher_spots += [t for _, t in pairs]
            else:
                student_spots += resolve_spots([spot], student.num_stages)
                teacher_spots += resolve_spots([spot], teacher.num_stages)
    else:
        student_spots = resolve_spots(spots, student.num_stages)
        teacher_spots = resolve_spots(spots, teacher.num_stages)
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
    distiller.read_networks(student, teacher, student_spots, teacher_spots)
    return distiller, student_spots, teacher_spots


def require_preacts(name: str, cls: type, student: StagedModel, teacher: StagedModel) -> None:
    """Refuse a network cut automatically (timm, torchvision, your own) where the method is defined only on
    pre-activations (`Distiller.preacts_required`: AB's signs, OFD's margins); others reading them (ReviewKD) take the
    stage outputs such a network gives, as before."""
    if not cls.preacts_required:
        return
    for role, net, wanted in (("student", student, cls.student_preact), ("teacher", teacher, cls.teacher_preact)):
        if wanted and getattr(net, "auto_cut", False):
            raise ValueError(f"{name} reads the {role}'s pre-activation features (before each stage's last ReLU), "
                             f"but the {role} {type(net.model).__name__} is staged automatically from its traced "
                             "forward, which gives none; use an adakd zoo model there (adakd models) or another "
                             "method")


def body_sizes(shapes: Sequence[tuple[int, ...]]) -> dict[int, tuple[int, int]]:
    """Spatial size (H, W) of each body stage f1..fN that is a map; token and vector outputs have none."""
    return {k: (shape[1], shape[2]) for k, shape in enumerate(shapes[1:-2], 1) if len(shape) == 3}


def pair_stages_by_size(student_shapes: Sequence[tuple[int, ...]],
                        teacher_shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(student stage, teacher stage) for every spatial size both networks' body stages reach, in student order.

    Shapes are those of the staged views' probe forward [stem, f1..fN, pooled, logits], so one input gives both
    networks the same size at the same total stride. Where several stages of one network share a size, the last of
    them (its deepest feature at that resolution, as timm's feature_info keeps) takes part; a stage whose size the
    other network never reaches is left out.
    """
    last_teacher: dict[tuple[int, int], int] = {}
    for stage, size in body_sizes(teacher_shapes).items():
        last_teacher[size] = stage
    last_student: dict[tuple[int, int], int] = {}
    for stage, size in body_sizes(student_shapes).items():
        last_student[size] = stage
    return sorted((stage, last_teacher[size]) for size, stage in last_student.items() if size in last_teacher)


def stage_list(net: StagedModel, shapes: Sequence[tuple[int, ...]]) -> str:
    """'stage1 16x32x32, stage2 32x16x16, ...': a network's body stages with their measured shapes."""
    return ", ".join(f"{net.stage_names[k]} {'x'.join(map(str, shapes[k]))}" for k in range(1, len(shapes) - 2))


def pairing_text(name: str, student: StagedModel, teacher: StagedModel, student_shapes: Sequence[tuple[int, ...]],
                 pairs: list[tuple[int, int]]) -> str:
    """One line saying which student stage is distilled from which teacher stage, and which are left out."""
    sizes = body_sizes(student_shapes)
    paired = ", ".join(f"student {student.stage_names[s]} <- teacher {teacher.stage_names[t]} "
                       f"({sizes[s][0]}x{sizes[s][1]})" for s, t in pairs)
    paired_students = {s for s, _ in pairs}
    left = [f"{student.stage_names[k]}" + (f" ({sizes[k][0]}x{sizes[k][1]})" if k in sizes else "")
            for k in range(1, student.num_stages - 2) if k not in paired_students]
    unpaired = f"; not distilled (no teacher stage of that size): student {', '.join(left)}" if left else ""
    return (f"{name}: the student has {student.num_stages - 3} body stages and the teacher {teacher.num_stages - 3}, "
            f"so stages are paired by spatial size: {paired}{unpaired} (choose others with distill.spots)")
