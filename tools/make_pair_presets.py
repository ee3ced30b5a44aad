"""Write the teacher-student pair presets of both papers into src/adakd/presets (run by hand, output committed).

Sources: reference/paper-results.md (pairs of SAKD Tables III-V and ABL Tables 1-2, the CRD benchmark) and
reference/recipes.md (lr 0.01 for MobileNetV2/ShuffleNet students; DKD's per-pair beta from mdistiller).
"""
from pathlib import Path

CIFAR = [
    # teacher, student, DKD beta
    ("resnet56", "resnet20", 2.0), ("resnet110", "resnet32", 2.0), ("resnet110", "resnet20", 2.0),
    ("resnet32x4", "resnet8x4", 8.0), ("vgg13", "vgg8", 6.0), ("wrn_40_2", "wrn_16_2", 6.0),
    ("wrn_40_2", "wrn_40_1", 6.0), ("vgg13", "MobileNetV2", 6.0), ("ResNet50", "MobileNetV2", 8.0),
    ("ResNet50", "vgg8", 8.0), ("resnet32x4", "resnet32", 8.0), ("wrn_40_2", "ShuffleV1", 8.0),
    ("resnet32x4", "ShuffleV1", 8.0), ("resnet32x4", "ShuffleV2", 8.0),
    # the SAKD code's width-1.0 MobileNetV2 (its configs); the paper's numbers are width 0.5's (model-zoo quirk 3)
    ("vgg13", "mobilev2", 6.0), ("ResNet50", "mobilev2", 8.0),
]
TINY = [("resnet56", "resnet20"), ("resnet110", "resnet20"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_16_2"),
        ("vgg13", "MobileNetV2"), ("vgg13", "mobilev2")]
IMAGENET = [("resnet34", "resnet18", 0.5), ("resnet50", "mobilenetv1", 2.0)]
MOBILE = {"MobileNetV2", "mobilev2", "ShuffleV1", "ShuffleV2"}


def preset(base: str, teacher: str, student: str, beta: float | None, note: str) -> str:
    lines = [f"# {teacher} -> {student}, {note}. Give the teacher's checkpoint with teacher.weights=PATH",
             "# (or set ADAKD_TEACHERS to a folder of <name>_vanilla/ckpt_epoch_240.pth).",
             f"base: {base}", "task: distill", "model:", f"  name: {student}", "teacher:", f"  name: {teacher}"]
    if student in MOBILE and base != "imagenet":
        lines += ["optim:", "  lr: 0.01"]
    if beta is not None:
        lines += ["distill:", "  by_method:", "    dkd:", "      args:", f"        beta: {beta}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "src" / "adakd" / "presets"
    for old in out.glob("pair-*.yaml"):
        old.unlink()
    for teacher, student, beta in CIFAR:
        (out / f"pair-{teacher}-{student}.yaml").write_text(preset("cifar100", teacher, student, beta, "CIFAR-100"))
    for teacher, student in TINY:
        text = preset("tiny-imagenet", teacher, student, None, "Tiny-ImageNet (SAKD Table V)")
        (out / f"pair-tiny-{teacher}-{student}.yaml").write_text(text)
    for teacher, student, beta in IMAGENET:
        text = preset("imagenet", teacher, student, beta, "ImageNet (torchvision teacher weights)")
        (out / f"pair-imagenet-{teacher}-{student}.yaml").write_text(text)


if __name__ == "__main__":
    main()
