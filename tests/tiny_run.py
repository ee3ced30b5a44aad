"""What tests share to make a real run small: one tiny-run override list and a random zoo teacher on disk.

`from tiny_run import TINY_RUN, save_random_teacher` (pytest puts tests/ on sys.path); the `random_teacher` fixture
of tests/conftest.py writes into the test's tmp_path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from adakd import models

# One epoch of a resnet8 on 64 images of 8x8 pixels, quiet. A test that needs more (epochs, images, a schedule)
# appends its own overrides after this list: later ones win.
TINY_RUN = ["data.image_size=8", "data.train_size=64", "data.batch_size=32", "optim.epochs=1", "optim.milestones=[]",
            "model.name=resnet8", "log.progress=false", "log.tensorboard=false"]


def save_random_teacher(path: Path, name: str = "resnet8", num_classes: int = 10, *, seed: int | None = None,
                        epoch: int | None = None) -> Path:
    """Write {"model": state_dict} of a randomly initialised zoo model `name` to `path` and return the path.

    `seed` seeds torch first (else the test's RNG state decides the weights); `epoch` adds the "epoch" entry that
    the CRD benchmark's teacher files carry.
    """
    if seed is not None:
        torch.manual_seed(seed)
    checkpoint = {"model": models.create(name, num_classes=num_classes).state_dict()}
    if epoch is not None:
        checkpoint = {"epoch": epoch, **checkpoint}
    torch.save(checkpoint, path)
    return Path(path)
