"""Train/eval mode switches that put every module back exactly as it was (a ground-floor module)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put `modules` in eval mode for the block, then restore every submodule's own previous `training` flag.

    Saving the flag per submodule (not only the root's) keeps mixed trees as they were: a frozen teacher or a
    BatchNorm held in eval inside a training model stays in eval afterwards, which `module.train(was_training)`
    would undo. `None` entries are skipped so optional parts can be passed as they are.
    """
    present = [m for m in modules if m is not None]
    # Saved before any switch, so overlapping or nested arguments record their original flags.
    saved = [(sub, sub.training) for m in present for sub in m.modules()]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for sub, training in saved:
            sub.training = training


__all__ = ["eval_mode"]
