"""Strict, safe loading of model weights from CRD-benchmark, torchvision or adakd files."""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def load_state_dict_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint with `weights_only=True` on CPU; a pickled object or a broken file raises."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass the path of a .pth/.pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if not any("Weights only load failed" in line for line in lines):  # a broken pickle stream, not a refusal
            raise CheckpointError(
                f"checkpoint {path!r} is truncated or not a PyTorch file (UnpicklingError: "
                f"{lines[0] if lines else 'no detail'}). Re-download or re-save it."
            ) from None
        # torch's message advises weights_only=False; for an untrusted file that would run its code, so we name
        # only the offending global.
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(
            f"refusing to load {path!r}: it holds objects other than tensors and plain containers, and "
            f"unpickling them could run code ({detail.rstrip('.')}); nothing in it was executed. Re-save only "
            "the state_dict (torch.save(model.state_dict(), path)) from a source you trust."
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, legacy format, random bytes: all one user problem
        first = str(err).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(err).strip() else "no detail"
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or not a PyTorch file ({type(err).__name__}: {first}). "
            "Re-download or re-save it."
        ) from None


def extract_model_state(obj: Any, path: str = "<checkpoint>") -> Mapping[str, Tensor]:
    """The model state_dict inside a checkpoint: its 'model' entry (CRD, SAKD, adakd) or the dict itself."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path!r} holds no state_dict: expected a dict of tensors or a dict with a 'model' entry"
        )
    return obj


def describe_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """A readable list of missing, unexpected and mis-shaped keys ('' when the state fits exactly)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def load_weights(model: nn.Module, path: str | os.PathLike, model_name: str | None = None) -> nn.Module:
    """Load a checkpoint into `model` strictly; any key or shape mismatch raises naming the keys."""
    path = os.fspath(path)
    state = extract_model_state(load_state_dict_file(path), path)
    problem = describe_mismatch(model, state)
    if problem:
        which = f" {model_name!r}" if model_name else ""
        raise CheckpointError(
            f"checkpoint {path!r} does not fit model{which} ({problem}). "
            "Check that the model name matches the architecture the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=True)
    return model
