"""The README's walk-through runs as written: a pretrained timm teacher fine-tuned on a folder of photos, a pretrained
timm student distilled from it with KD under SAKD, exported, and loaded back in plain timm.

Offline: the Hugging Face hub cache holds weights this test writes for the two names the README uses (random
1000-class weights, since only the mechanism is under test), and the runs are cut to one epoch on 12 small photos.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adakd.cli import main
from cli_checks import hub_cache_weights

timm = pytest.importorskip("timm")

README = Path(__file__).resolve().parents[1] / "README.md"
# What the test adds to each command so it takes seconds: later KEY=VALUE overrides win.
QUICK = {"train": ["epochs=1", "data.batch_size=4", "log.tensorboard=false"],
         "distill": ["epochs=1", "data.batch_size=4", "log.tensorboard=false"],
         "export": ["--latency-batch", "1"]}


def walkthrough() -> tuple[list[list[str]], str]:
    """The walk-through's adakd commands (continuation lines joined) and its python block."""
    section = README.read_text().split("### Walk-through", 1)[1].split("\n## ", 1)[0]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(bash) == 1 and len(python) == 1, "the walk-through holds one bash and one python block"
    commands = [shlex.split(line) for line in bash[0].replace("\\\n", " ").splitlines() if line.strip()]
    assert all(command[0] == "adakd" for command in commands)
    return [command[1:] for command in commands], python[0]


def photos(root: Path) -> None:
    """train/ and val/ with two classes of small photos: reddish and bluish."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = np.clip(rng.normal(colour, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg")


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys, hub_cache):
    commands, python = walkthrough()
    names = {argument.split(":", 1)[1] for command in commands for argument in command
             if argument.startswith(("model.name=timm:", "teacher.name=timm:"))}
    published = {name: hub_cache_weights(hub_cache, name) for name in names}
    monkeypatch.chdir(tmp_path)
    photos(tmp_path / "photos")

    for command in commands:
        assert main([*command, *QUICK[command[0]]]) == 0, command
    teacher_log = (tmp_path / "runs" / "photos_teacher" / "log.txt").read_text()
    assert "preprocessing from the" in teacher_log and "data.image_size=224" in teacher_log

    capsys.readouterr()
    exec(compile(python, str(README), "exec"), {"__name__": "readme_walkthrough"})
    assert capsys.readouterr().out.strip() in ("class0", "class1")

    # The exported file is exactly the run's student, with timm's own keys and the photos' two classes.
    from safetensors.torch import load_file

    from adakd.engine.checkpoint import load_run_checkpoint

    exported = load_file(tmp_path / "student.safetensors")
    trained = load_run_checkpoint(tmp_path / "runs" / "photos_student" / "last.pth")["model"]
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[key], trained[key]) for key in exported)
    student = next(name for name in names if "mobilenet" in name)
    assert exported.keys() == published[student].keys()
    assert exported["classifier.weight"].shape[0] == 2
