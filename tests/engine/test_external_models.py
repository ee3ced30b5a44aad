"""timm and torchvision models through the whole engine: every family x {kd, at, crd} x {standard, sakd, abl}.

Random weights and tiny sizes (nothing downloads): each run trains a few epochs on the synthetic set and its
student's training cross-entropy must fall. The teacher of each family is trained first and loaded strictly
from its run's last.pth.
"""
from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import pytest

pytest.importorskip("timm")

import torch  # noqa: E402

from adakd import distillers  # noqa: E402
from adakd.cli import main  # noqa: E402
from adakd.engine.config import resolve  # noqa: E402
from adakd.engine.trainer import Trainer  # noqa: E402
from markers import slow_except  # noqa: E402

FAMILIES = {
    "resnet": "timm:resnet10t",
    "convnext": "timm:convnext_atto",
    # timm's smallest EfficientNet (0.1 M parameters: depthwise-separable, edge-residual and inverted-residual blocks
    # with squeeze-excitation, SiLU, conv_head), with GroupNorm as in timm's efficientnet_b0_gn. Measured on 2 seeds:
    # all 9 runs' losses fall, the whole family costs ~15 s. Its BatchNorm twin test_efficientnet learns too, but
    # under kd x sakd its student's CE rose on 4 of 4 seeds (0.327 -> 0.351 -> 0.452 at seed 0) while its train
    # accuracy rose (12.5 -> 31.3 %): the EfficientNet/MobileNet ("goog") init draws the 10-class classifier from
    # U(+-1/sqrt(10)), so its logits start large (first-epoch CE 2.95-3.56 > ln 10) and two T=4 KL terms (KD and
    # SAKD's KL) dominate a CE weighted 0.1. efficientnet_lite0 (3.4 M) diverges at lr 0.01 (test loss 6.9 -> 96.8).
    "efficientnet": "timm:test_efficientnet_gn",
    "mobilenetv3": "timm:mobilenetv3_small_050",
    "regnet": "timm:regnetx_002",
    "vit": "timm:vit_tiny_patch16_224",
}
# Mixed pairs: (teacher, student).
MIXED = {"torchvision-to-timm": ("torchvision:resnet18", "timm:resnet10t"),
         "timm-to-adakd": ("timm:resnet10t", "resnet8")}
# mobilenetv3_small_050 does not learn the randomly cropped and flipped synthetic set within these steps, plain CE
# included: its teacher's 4 epochs (16 steps) measured 2.80 -> 2.70 -> 3.21 -> 3.30 (chance: ln 10 = 2.30). The random
# crop is the cause (un-augmented: 2.88 -> 1.75; flips only: 2.55 -> 2.02; crops only: 3.00 -> 2.72), learnt only
# slowly by a net that at 32 px is down to 8 channels at 8 x 8 after its first block and to 2 x 2 and 1 x 1 maps in
# its last stages, and its start above chance is the "goog" init's large 10-class classifier. Tried, none reliably
# within the time: lr 0.001-0.1, no weight decay, head_norm=true, act_layer=relu, the minimal / _075 / _100 /
# large_075 variants (all diverge), no augmentation (KD runs then rise: 3.70 -> 3.94), data.image_size 64/96/128
# (96 px: teacher 2.39 -> 1.95 at seed 0 but 2.40 -> 2.33 at seed 1; 8, 6 and 6 of 9 runs fell on seeds 0-2); at
# 32 px plain CE falls only after ~9 epochs (2.68 ... 2.93 ... 1.86 at epoch 10), which would add ~1 min here. Its
# runs must finish with finite losses, and a separate test shows its step learning on fixed batches.
AUGMENTATION_BOUND = {"timm:mobilenetv3_small_050"}
STRATEGIES = {"standard": [], "sakd": ["distill.kl_weight=1"], "abl": ["strategy=abl-fixed"]}


def model_args(name: str, key: str) -> list[str]:
    return [f"{key}.args={{img_size: 32, patch_size: 8, depth: 4}}"] if "vit" in name else []


COMMON = ["dataset=synthetic", "data.train_size=64", "data.batch_size=16", "data.num_workers=0", "optim.milestones=[]",
          "lr=0.01", "log.progress=false", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teachers of every family, each trained 4 epochs on the synthetic set: a random teacher's features pull a
    student anywhere (AT and CRD on them made some students' CE rise), which would test nothing."""
    root = tmp_path_factory.mktemp("teachers")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            label = name.replace(":", "_")
            assert main(["train", *COMMON, "epochs=4", f"model.name={name}", f"out_dir={root}", f"name={label}",
                         *model_args(name, "model")]) == 0
            made[name] = root / label / "last.pth"
        return made[name]

    return get


def cases() -> list:
    pairs = {family: (name, name) for family, name in FAMILIES.items()} | MIXED
    found = []
    for (label, (teacher, student)), method, strategy in itertools.product(pairs.items(), ["kd", "at", "crd"],
                                                                             STRATEGIES):
        if label in MIXED and strategy != "standard":
            continue  # the mixed pairs check building and loading across libraries; one strategy is enough
        found.append(pytest.param(teacher, student, method, strategy, id=f"{label}-{method}-{strategy}"))
    return found


# The inner loop keeps a diagonal: each distiller, each strategy, a CNN, a ViT and a cross-library pair;
# the whole matrix (60 runs, ~3 min on 2 cores) runs in CI.
INNER_LOOP = ["resnet-kd-standard", "resnet-at-sakd", "vit-crd-abl", "timm-to-adakd-kd-standard"]


@pytest.mark.parametrize("teacher, student, method, strategy", slow_except(cases(), INNER_LOOP))
def test_family_learns_under_every_distiller_and_strategy(tmp_path, teachers, teacher, student, method, strategy):
    argv = ["distill", *COMMON, "epochs=3", f"model.name={student}", f"teacher.name={teacher}",
            f"teacher.weights={teachers(teacher)}", f"method={method}",
            f"out_dir={tmp_path}", "name=run", "distill.args.num_negatives=64" if method == "crd" else "seed=0",
            *model_args(student, "model"), *model_args(teacher, "teacher"), *STRATEGIES[strategy]]
    if strategy == "sakd":
        argv.append("strategy=sakd")
    if method == "at" and student == "resnet8":
        argv.append("distill.spots=[1,2,3]")  # resnet10t has 4 body stages, the CIFAR resnet8 3
    assert main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    # The objective the step descends must fall, except where it cannot show learning in 12 steps: under SAKD it
    # holds the terms the policy switches on as it learns, and CRD's NCE term rises while its memory banks fill
    # (measured: 9.2 -> 10.5 -> 9.4 while CE fell 2.32 -> 2.27 -> 2.22); there the student's CE is the measure.
    column = "train/ce" if strategy == "sakd" or method == "crd" else "train/loss"
    losses = [float(r[column]) for r in rows]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    if student in AUGMENTATION_BOUND:
        return
    assert losses[-1] < losses[0], losses


def test_mobilenetv3_learns_on_fixed_batches(tmp_path):
    """The step through the automatic view learns (12 passes over 64 un-augmented samples)."""
    config = resolve(["cifar100"], None, [*COMMON, f"out_dir={tmp_path}", "model.name=timm:mobilenetv3_small_050"])
    trainer = Trainer(config)
    images, targets = (torch.stack([trainer.train_set[i][k] for i in range(64)]) if k == 0 else
                       torch.tensor([trainer.train_set[i][k] for i in range(64)]) for k in (0, 1))
    losses = []
    for epoch in range(6):
        steps = [trainer.strategy.training_step(images[i:i + 16], targets[i:i + 16], torch.arange(i, i + 16), 1, 0)
                 for i in range(0, 64, 16)]
        losses.append(float(torch.stack([s["loss"] for s in steps]).mean()))
    assert losses[-1] < 0.5 * losses[0], losses


TOKEN_MAPS_REFUSED = {"fitnets", "ft", "nst", "vid", "reviewkd", "kdsvd", "fsp", "ickd", "dist_plus"}
PREACTS_REFUSED = {"ab", "ofd"}  # a ViT cut from its traced forward has no pre-activation outputs


@pytest.mark.parametrize("method", slow_except(distillers.available(), ["kd", "fitnets"]))
def test_every_distiller_runs_on_a_vit_or_refuses_token_maps_in_one_line(tmp_path, teachers, capsys, method):
    vit = FAMILIES["vit"]
    argv = ["distill", *COMMON, "data.train_size=32", "epochs=1", f"model.name={vit}", f"teacher.name={vit}",
            f"teacher.weights={teachers(vit)}", f"method={method}", f"out_dir={tmp_path}", "name=run",
            *model_args(vit, "model"), *model_args(vit, "teacher")]
    code = main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adakd: error:")]
    if method in TOKEN_MAPS_REFUSED:
        assert code == 2 and len(errors) == 1 and "(17, 192)" in errors[0], errors
    elif method in PREACTS_REFUSED:
        assert code == 2 and len(errors) == 1 and "pre-activation" in errors[0], errors
    else:
        assert code == 0 and not errors


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet10t", FAMILIES["vit"]])
def test_eval_scores_a_timm_or_torchvision_run_as_it_trained(teachers, capsys, name):
    """`adakd eval RUN` rebuilds the run's model from its own config (source library, `model.args` of the ViT) and
    prints the run's own last-epoch top-1: the model it rebuilt is the one training built."""
    run = teachers(name).parent
    capsys.readouterr()
    assert main(["eval", str(run), "log.progress=false"]) == 0
    printed = capsys.readouterr().out
    last = float(list(csv.DictReader(open(run / "metrics.csv")))[-1]["test/acc1"])
    assert f"top-1 {last:.2f}%" in printed, printed
