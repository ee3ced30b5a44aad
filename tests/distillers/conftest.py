"""Fixtures of the distiller tests."""
from __future__ import annotations

import pytest

from distiller_checks import SYNTHETIC


# One teacher for the whole session: every learning test reads it, none writes it (each module training its own
# cost ~1.6 s apiece in the inner loop).
@pytest.fixture(scope="session")
def synthetic_teacher(tmp_path_factory):
    """A resnet14 teacher trained 4 epochs on the synthetic set (a random teacher would teach nothing)."""
    from adakd.cli import main

    root = tmp_path_factory.mktemp("teacher")
    assert main(["train", *SYNTHETIC, "epochs=4", "model.name=resnet14", f"out_dir={root}", "name=t"]) == 0
    return root / "t" / "last.pth"
