"""Run checkpoints: everything needed to resume exactly, written atomically, read with weights_only."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from adakd.models.checkpoint import CheckpointError, load_state_dict_file

FORMAT = "adakd-run-v1"


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may draw from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: os.replace is atomic on POSIX and Windows.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_run_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an adakd run checkpoint safely and check its format."""
    state = load_state_dict_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not an adakd run checkpoint (format {FORMAT}); "
            "to start from bare weights use model.weights=PATH instead of --resume"
        )
    return state
