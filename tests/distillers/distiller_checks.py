"""Shared pieces of the distiller tests: the cached zoo models, the zoo pairs and the common mask checks.

Imported by the test files of this folder as `from distiller_checks import ...` (pytest's default import mode puts
a test file's folder on sys.path). Every model is built once per session: zoo builds dominate the CPU time.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import torch

import adakd.distillers as D
import adakd.models as M

# The six (teacher, student) pairs of reference/model-zoo.md §6 that every method is run on.
PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"), ("resnet32x4", "ShuffleV1"),
         ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
ZOO_BATCH = 4


@lru_cache(maxsize=None)
def _staged(name: str, num_classes: int) -> M.StagedModel:
    torch.manual_seed(0)
    return M.staged(M.create(name, num_classes=num_classes)).eval()


def staged_model(name: str, num_classes: int = 100) -> M.StagedModel:
    """The eval-mode staged zoo model `name`, initialised from seed 0 and built once per session.

    Callers must not train it or leave gradients on it: it is shared by every test of this folder.
    """
    return _staged(name, num_classes)


@lru_cache(maxsize=None)
def zoo_outputs(name: str, preact: bool = False) -> M.StagedOutput:
    """The outputs of `staged_model(name)` on one fixed batch of 4 images, without gradients."""
    images = torch.randn(ZOO_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return staged_model(name)(images, preact=preact)


def zoo_model(name: str):
    """(model, features on the fixed batch) of the zoo model `name`."""
    return staged_model(name), zoo_outputs(name).features


@dataclass
class ZooPair:
    """A distiller built by `D.create` for a zoo pair, its inputs on real features and its terms on them."""

    student: M.StagedModel
    teacher: M.StagedModel
    distiller: D.Distiller
    student_spots: list[int]
    teacher_spots: list[int]
    inputs: tuple  # (student features, teacher features, targets) at the spots
    out: dict


def zoo_pair(method: str, teacher_name: str, student_name: str, targets: torch.Tensor | None = None,
             **forward_args) -> ZooPair:
    """Build `method` for (teacher, student) at its default spots and run it once on the zoo features."""
    (student, fs), (teacher, ft) = zoo_model(student_name), zoo_model(teacher_name)
    distiller, student_spots, teacher_spots = D.create(method, student, teacher, (3, 32, 32))
    if targets is None:
        targets = torch.zeros(ZOO_BATCH, dtype=torch.long)
    inputs = ([fs[k] for k in student_spots], [ft[k] for k in teacher_spots], targets)
    out = distiller(*inputs, **forward_args)
    return ZooPair(student, teacher, distiller, student_spots, teacher_spots, inputs, out)


def assert_zoo_state_dict_round_trip(method: str, pair: ZooPair) -> None:
    """A second distiller loaded from the first one's state_dict gives exactly the same terms."""
    restored, _, _ = D.create(method, pair.student, pair.teacher, (3, 32, 32))
    restored.load_state_dict(pair.distiller.state_dict())
    again = restored(*pair.inputs)
    assert all(torch.equal(again[k], v) for k, v in pair.out.items())


def check_gradient(loss: Callable, student_shape: tuple, teacher_shape: tuple, *args) -> None:
    """`loss(student, teacher, *args)` passes gradcheck in float64 on random inputs of the given shapes."""
    student = torch.randn(*student_shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*teacher_shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, *args), (student,))


def check_float32_under_autocast(loss: Callable, student_shape: tuple, teacher_shape: tuple) -> None:
    """Under CPU bfloat16 autocast `loss` gives exactly its float32 value on random float32 inputs."""
    student, teacher = torch.randn(*student_shape), torch.randn(*teacher_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student, teacher)
    assert torch.equal(under_autocast, loss(student, teacher))


def assert_gradients_follow_mask(feature: torch.Tensor, mask: torch.Tensor) -> None:
    """Masked-out samples get exactly zero gradient; every selected sample gets some."""
    assert torch.all(feature.grad[mask == 0] == 0)
    assert torch.all(feature.grad[mask == 1].flatten(1).abs().sum(1) > 0)


def one_spot(distiller, key: str, student, teacher, targets=None, **kwargs) -> torch.Tensor:
    """The term `key` of a one-spot distiller on (student, teacher), targets all zero unless given."""
    if targets is None:
        targets = torch.zeros(len(student), dtype=torch.long)
    return distiller([student], [teacher], targets, **kwargs)[key]


def check_all_ones_mask(distiller, key: str, student, teacher) -> torch.Tensor:
    """An all-ones mask gives exactly the unmasked term, which is returned."""
    plain = one_spot(distiller, key, student, teacher)
    assert torch.equal(plain, one_spot(distiller, key, student, teacher, masks=[torch.ones(len(student))]))
    return plain


def check_sub_batch_mask(distiller, key: str, student, teacher, mask, sub_batch_value: Callable) -> None:
    """A relational term under `mask` is `sub_batch_value(selected student, selected teacher)` times n/B;
    after its backward masked-out samples have zero gradient and the teacher none."""
    keep = mask.bool()
    masked = one_spot(distiller, key, student, teacher, masks=[mask])
    assert torch.allclose(masked, sub_batch_value(student[keep], teacher[keep]) * int(keep.sum()) / len(mask))
    masked.backward()
    assert teacher.grad is None
    assert torch.all(student.grad[~keep] == 0)


def check_degenerate_selections(distiller, key: str, student, teacher, gradient_may_be_none: bool = True) -> None:
    """0 or 1 selected samples: the term is an exact zero and its backward leaves zero (finite) gradients."""
    for selected in (0, 1):
        student.grad = None
        few = torch.zeros(len(student))
        few[:selected] = 1
        zero = one_spot(distiller, key, student, teacher, masks=[few])
        zero.backward()
        no_gradient = gradient_may_be_none and student.grad is None
        assert zero.item() == 0.0 and (no_gradient or torch.all(student.grad == 0))


def check_relational_masking(distiller, key: str, loss: Callable, student_shape: tuple, teacher_shape: tuple,
                             mask) -> None:
    """The whole masking contract of a parameter-free relational term `loss` (SP, PKT, RKD), on random float64
    features of a batch of `len(mask)` with the given per-sample shapes."""
    student = torch.randn(len(mask), *student_shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(len(mask), *teacher_shape, dtype=torch.float64, requires_grad=True)
    plain = check_all_ones_mask(distiller, key, student, teacher)
    assert torch.equal(plain, loss(student, teacher))
    check_sub_batch_mask(distiller, key, student, teacher, mask, loss)
    check_degenerate_selections(distiller, key, student, teacher)


SPATIAL_MASKS = [torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([0.0, 1, 1, 1, 0, 0])]


def check_two_spatial_spots(cls, loss: Callable, ones_masks: list, checked: int):
    """Per-sample masking of a parameter-free spatial method (AT, NST) over two spots of a batch of 6.

    An all-ones mask (`ones_masks`, None meaning no mask) equals no mask exactly; the term of spot `checked` is
    the batch mean of `loss` with zeros for masked-out samples; gradients follow the masks; teacher features
    get none; the module has no state; pooled vectors are refused.
    """
    name = cls.__name__.lower()
    module = cls(["stage1", "stage2"], [(2, 4, 4), (3, 2, 2)], [(4, 4, 4), (6, 2, 2)])
    student = [torch.randn(6, 2, 4, 4, requires_grad=True), torch.randn(6, 3, 2, 2, requires_grad=True)]
    teacher = [torch.randn(6, 4, 4, 4, requires_grad=True), torch.randn(6, 6, 2, 2, requires_grad=True)]
    targets = torch.zeros(6, dtype=torch.long)
    plain = module(student, teacher, targets)
    assert list(plain) == [f"{name}/stage1", f"{name}/stage2"]
    ones = module(student, teacher, targets, masks=ones_masks)
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    masked = module(student, teacher, targets, masks=SPATIAL_MASKS)
    expected = (loss(student[checked], teacher[checked]) * SPATIAL_MASKS[checked]).sum() / 6
    assert torch.allclose(masked[f"{name}/stage{checked + 1}"], expected)
    sum(masked.values()).backward()
    for feat, mask in zip(student, SPATIAL_MASKS):
        assert_gradients_follow_mask(feat, mask)
    assert all(t.grad is None for t in teacher)
    assert not module.state_dict()
    with pytest.raises(ValueError, match="spatial maps"):
        cls(["pooled"], [(8,)], [(8,)])


def check_state_dict_round_trip(first, second, key: str, student_shape: tuple, teacher_shape: tuple):
    """`second` loaded from `first`'s state_dict gives exactly its term `key` in eval mode on a random batch of 4.

    Returns that batch's (student, teacher).
    """
    second.load_state_dict(first.state_dict())
    first.eval(), second.eval()
    student, teacher = torch.randn(4, *student_shape), torch.randn(4, *teacher_shape)
    assert torch.equal(one_spot(first, key, student, teacher), one_spot(second, key, student, teacher))
    return student, teacher


def check_zoo_parameter_free_term(method: str, teacher_name: str, student_name: str, method_weight: float,
                                  spots: tuple) -> ZooPair:
    """A one-term method without parameters (SP, PKT, RKD) on a zoo pair: its defaults, no state, a finite term."""
    pair = zoo_pair(method, teacher_name, student_name)
    distiller = pair.distiller
    assert distiller.defaults.method_weight == method_weight and distiller.defaults.spots == spots
    assert not distiller.state_dict()
    assert len(pair.out) == 1 and torch.isfinite(next(iter(pair.out.values())))
    return pair


def check_zoo_stage_terms(method: str, teacher_name: str, student_name: str, defaults: D.DistillerDefaults) -> None:
    """A method on every body stage but the last (AT, NST): its defaults, spots and positive finite terms."""
    pair = zoo_pair(method, teacher_name, student_name)
    assert pair.distiller.defaults == defaults
    assert pair.student_spots == pair.teacher_spots == list(range(1, pair.student.num_stages - 2))
    assert list(pair.out) == [f"{method}/stage{k}" for k in pair.student_spots]
    assert all(torch.isfinite(v) and v > 0 for v in pair.out.values())


# ---- learning on the synthetic set (the new methods' runs under standard, SAKD and ABL)

SYNTHETIC = ["dataset=synthetic", "data.train_size=64", "data.batch_size=16", "data.num_workers=0",
             "optim.milestones=[]", "lr=0.01", "log.progress=false", "log.tensorboard=false",
             "log.eval_every=100"]  # the test split only after the last epoch: these tests read the train columns
LEARNING_STRATEGIES = {"standard": [], "sakd": ["strategy=sakd", "distill.kl_weight=1"],
                       "abl": ["strategy=abl-fixed"]}


def learning_run(tmp_path: Path, teacher: Path, method: str, strategy: str, *extra: str,
                 epochs: int = 3) -> list[dict[str, str]]:
    """A resnet14 -> resnet8 run of `method` under `strategy` on the synthetic set; its metrics.csv rows, after
    checking the method logged finite terms every epoch."""
    from adakd.cli import main

    argv = ["distill", *SYNTHETIC, f"epochs={epochs}", "model.name=resnet8", "teacher.name=resnet14",
            f"teacher.weights={teacher}", f"method={method}", f"out_dir={tmp_path}", "name=run", *extra,
            *LEARNING_STRATEGIES[strategy]]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    method_columns = [c for c in rows[0] if c.startswith(f"train/{method}/")]
    assert method_columns, rows[0].keys()
    assert all(math.isfinite(float(r[c])) for r in rows for c in method_columns)
    assert len(rows) == epochs
    return rows


def assert_learned(rows: list[dict[str, str]], strategy: str, epochs: int = 3) -> None:
    """The run's loss fell from the first epoch to the last. Under SAKD the objective holds the terms its policy
    switches on as it learns, so there the student's CE is the measure."""
    column = "train/ce" if strategy == "sakd" else "train/loss"
    losses = [float(r[column]) for r in rows]
    assert len(losses) == epochs and losses[-1] < losses[0], losses


def fixed_logits(seed: int, batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 student (requires grad) and teacher logits, spread enough to be far from uniform (seeded)."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, classes, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    return student, teacher
