"""Issue #18 item 10: `adakd eval` of an `adakd abl` folder, run names that leave out_dir, the eval usage line,
top-5 with 5 classes or fewer, and feature distillers between networks with different numbers of stages.

Each CLI case runs `adakd.cli.main` in-process on the embedded digits or a tiny image folder (nothing downloads).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input import distill_argv, fails, run_argv
from torch import nn

from adakd import distillers as D
from adakd import models
from adakd.cli import main
from adakd.engine.loop import evaluate

# ---- a: `adakd eval` of an `adakd abl` folder


def test_eval_of_an_abl_folder_names_its_runs(tmp_path, capsys):
    root = tmp_path / "abl"
    for run in ("search", "final_seed0", "final_seed1", "final_seed10"):
        (root / run).mkdir(parents=True)
    (root / "pipeline.yaml").write_text("task: distill\n")
    line = fails(capsys, ["eval", str(root)], "is an `adakd abl` pipeline folder (pipeline.yaml), not a run",
                 f"e.g. `adakd eval {root / 'final_seed0'}`",
                 "runs here: final_seed0/, final_seed1/, final_seed10/, search/")
    assert "last.pth" not in line
    (root / "final_seed0").rmdir()  # the example names a final run that exists
    fails(capsys, ["eval", str(root), "--checkpoint", "best"], f"e.g. `adakd eval {root / 'final_seed1'}`")


# ---- c: a run name must be a plain folder name


@pytest.mark.parametrize("name", ["../../x", "/abs", "..", "a/b", "a\\b"])
def test_run_name_that_is_a_path_is_refused(tmp_path, capsys, name):
    out = tmp_path / "deep" / "runs"
    argv = [*run_argv(tmp_path, name=name), f"out_dir={out}"]  # the later out_dir wins
    fails(capsys, argv, f"name must be a plain folder name (no '/', '\\', '..' or absolute path), got {name!r}",
          "out_dir=PATH")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside out_dir or outside it


# ---- d: the usage of `adakd eval`


def test_eval_without_a_target_names_only_the_target_as_required(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "adakd eval: error: the following arguments are required: RUN_DIR_OR_CHECKPOINT"


# ---- e: top-5 only where it says something


class FixedLogits(nn.Module):
    """A 'classifier' returning the logits stored for each input index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]


def scores(logits: list[list[float]], targets: list[int]) -> dict[str, float]:
    batch = (torch.arange(len(targets)), torch.tensor(targets), None)
    return evaluate(FixedLogits(torch.tensor(logits)), [batch])


def test_top5_is_measured_only_with_more_than_5_classes():
    # 6 classes; sample 0's target ranks 1st, sample 1's 6th (last), sample 2's 5th, sample 3's 2nd.
    six = [[9, 1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 0], [2, 1, 9, 4, 5, 6], [0, 8, 9, 1, 2, 3]]
    result = scores(six, [0, 5, 0, 1])
    assert result["acc1"] == 25.0 and result["acc5"] == 75.0
    five = [row[:5] for row in six]  # with 5 classes every target is in the top 5: no acc5
    result = scores(five, [0, 4, 0, 1])
    assert set(result) == {"loss", "acc1"} and result["acc1"] == 25.0
    assert set(scores([[1.0, 2.0, 3.0, 4.0]], [3])) == {"loss", "acc1"}


def four_class_folder(root: Path) -> Path:
    """train/ and val/ with 4 classes of 8 x 8 PNGs (6 and 2 per class)."""
    rng = np.random.RandomState(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in range(4):
            for k in range(count):
                path = root / split / f"c{label}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(path)
    return root


def test_four_classes_print_and_log_no_top5(tmp_path, capsys):
    data = four_class_folder(tmp_path / "data")
    out = tmp_path / "runs"
    assert main(["train", "dataset=folder", f"data.root={data}", "data.image_size=8", "data.batch_size=8",
                 "data.num_workers=0", "model.name=resnet8", "epochs=2", "optim.milestones=[]", "log.tensorboard=false",
                 f"out_dir={out}", "name=r"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" not in printed
    run = out / "r"
    assert "top-5" not in (run / "log.txt").read_text()
    header = next(csv.reader(open(run / "metrics.csv")))
    assert "test/acc1" in header and "test/acc5" not in header  # omitted, not an empty or a 100 % column
    assert all("test/acc5" not in json.loads(line) for line in open(run / "metrics.jsonl"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_acc5"] is None and summary["best_acc5"] is None and summary["last_acc1"] is not None
    assert main(["eval", str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert f"top-1 {summary['last_acc1']:.2f}%  loss " in line and "top-5" not in line


# ---- g: "every stage" distillers between networks with different numbers of stages

EVERY_STAGE = ["at", "nst", "vid", "reviewkd"]


def staged(name: str, classes: int = 10):
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        return models.staged(timm.create_model(name[5:], pretrained=False, num_classes=classes))
    return models.staged(models.create(name, num_classes=classes))


def body_shapes(net, side: int) -> list[tuple[int, ...]]:
    return net.feature_shapes((3, side, side))[1:-2]


@pytest.mark.parametrize("method", EVERY_STAGE)
def test_timm_teacher_with_4_stages_pairs_the_zoo_student_stage_of_its_size(method):
    student, teacher = staged("resnet8"), staged("timm:resnet10t")
    # By hand at 32 x 32: resnet8 keeps 32 x 32 in stage 1 and halves in stages 2 and 3; resnet10t's stem halves
    # twice (stride-2 conv, max-pool) to 8 x 8, stage 1 keeps it, stages 2-4 halve it.
    assert body_shapes(student, 32) == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert body_shapes(teacher, 32) == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    said: list[str] = []
    distiller, s_spots, t_spots = D.create(method, student, teacher, (3, 32, 32), on_pairing=said.append)
    extra = [4] if method == "reviewkd" else []  # its default spots end with the pooled vector (-2), on both
    assert (s_spots, t_spots) == ([3, *extra], [1, *[5] * len(extra)])  # student stage3 8x8 <- teacher stage1 8x8
    assert said == [f"{method}: the student has 3 body stages and the teacher 4, so stages are paired by spatial "
                    "size: student stage3 <- teacher stage1 (8x8); not distilled (no teacher stage of that size): "
                    "student stage1 (32x32), stage2 (16x16) (choose others with distill.spots)"]
    x = torch.randn(2, 3, 32, 32)
    s_out, t_out = student(x, preact=True), teacher(x, preact=True)
    s_src = s_out.preacts if distiller.student_preact else s_out.features
    t_src = t_out.preacts if distiller.teacher_preact else t_out.features
    terms = distiller([s_src[k] for k in s_spots], [t_src[k] for k in t_spots], torch.tensor([0, 1]), epoch=30)
    assert sorted(terms) == sorted(f"{method}/{n}" for n in ["stage3", *(["pooled"] if extra else [])])
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("method", EVERY_STAGE)
def test_vgg8_teacher_pairs_two_of_three_stages_and_equal_counts_stay_index_paired(method):
    student, teacher = staged("resnet8"), staged("vgg8")
    # vgg8 at 32: the stem keeps 32 x 32, stages 1-3 halve (16, 8, 4), stage 4 stays at 4 x 4.
    assert [s[1:] for s in body_shapes(teacher, 32)] == [(16, 16), (8, 8), (4, 4), (4, 4)]
    _, s_spots, t_spots = D.create(method, student, teacher, (3, 32, 32))
    assert (s_spots[:2], t_spots[:2]) == ([2, 3], [1, 2])
    said: list[str] = []
    _, s_spots, t_spots = D.create(method, student, staged("resnet20"), (3, 32, 32), on_pairing=said.append)
    assert s_spots[:3] == t_spots[:3] == [1, 2, 3] and said == []  # same stage count: stage k <- stage k, silently


def test_explicit_spots_are_read_from_both_networks_as_given():
    _, s_spots, t_spots = D.create("at", staged("resnet8"), staged("vgg8"), (3, 32, 32), spots=[1, 2, 3])
    assert s_spots == t_spots == [1, 2, 3]


def test_distill_run_across_stage_counts_says_the_pairing_once(tmp_path, capsys):
    # FAST runs at 8 x 8: resnet8's stages are 8, 4, 2 wide, vgg8's 4, 2, 1, 1.
    assert main(distill_argv(tmp_path, "method=at", "log.progress=true", "epochs=2", teacher="vgg8")) == 0
    expected = ("at: the student has 3 body stages and the teacher 4, so stages are paired by spatial size: student "
                "stage2 <- teacher stage1 (4x4), student stage3 <- teacher stage2 (2x2); not distilled (no teacher "
                "stage of that size): student stage1 (8x8) (choose others with distill.spots)")
    assert capsys.readouterr().out.count(expected) == 1
    run = tmp_path / "runs" / "run"
    assert (run / "log.txt").read_text().count(expected) == 1
    header = next(csv.reader(open(run / "metrics.csv")))
    assert [c for c in header if c.startswith("train/at/")] == ["train/at/stage2", "train/at/stage3"]


def test_no_stage_of_the_same_size_is_one_error_line(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    vit_args = {"img_size": 8, "patch_size": 4, "depth": 4}
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **vit_args).state_dict(),
               path)
    argv = distill_argv(tmp_path, "method=at", "teacher.name=timm:vit_tiny_patch16_224",
                        "teacher.args={img_size: 8, patch_size: 4, depth: 4}", teacher_weights=path)
    fails(capsys, argv, "at cannot distill timm:vit_tiny_patch16_224 -> resnet8: at distills every body stage; the "
          "student has 3 and the teacher 4, so stages are paired by spatial size, but none match at input 3x8x8: "
          "student stage1 16x8x8, stage2 32x4x4, stage3 64x2x2; teacher stage1 5x192, stage2 5x192, stage3 5x192, "
          "stage4 5x192;", "distill.spots")
    assert not (tmp_path / "runs").exists()
