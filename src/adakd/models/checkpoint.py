"""Strict, safe loading of model weights from CRD-benchmark, torchvision, timm or adakd files (.pth or .safetensors)."""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """The file to read for `path`: the path itself, or a run folder's last.pth."""
    path = os.fspath(path)
    if os.path.isdir(path):
        last = os.path.join(path, "last.pth")
        if not os.path.isfile(last):
            raise CheckpointError(
                f"{path!r} is a folder without last.pth; give a checkpoint file (.pth/.pt) or a run folder that "
                "finished an epoch"
            )
        return last
    return path


def _load_safetensors(path: str) -> dict[str, Tensor]:
    """A .safetensors file's tensors on CPU (the format holds tensors only, so nothing can run)."""
    try:
        from safetensors.torch import load_file  # imported here: only .safetensors files need the package
    except ImportError:
        raise CheckpointError(f"{path!r} is a .safetensors file; reading it needs the safetensors package: "
                              'pip install safetensors (pip install "adakd[timm]" brings it)') from None
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - a bad header or a cut file: one user problem
        first = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        raise CheckpointError(f"checkpoint {path!r} is truncated or not a safetensors file ({type(err).__name__}: "
                              f"{first}). Re-download or re-save it.") from None


def load_state_dict_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint (or a run folder's last.pth) on CPU: .safetensors, or torch with `weights_only=True`."""
    path = resolve_checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass the path of a .pth/.pt/.safetensors file")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
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


# Entries that hold the model's state_dict: adakd, CRD and SAKD save 'model'; timm's train script and PyTorch
# Lightning 'state_dict'; many hand-written training loops 'model_state_dict'.
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values())


def _unwrap(obj: Any) -> tuple[Any, str | None]:
    """The first wrapper entry holding a dict of tensors, and its key (None: the object as found)."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and _is_state(obj[key]):
                return obj[key], key
    return obj, None


def extract_model_state(obj: Any, path: str = "<checkpoint>") -> Mapping[str, Tensor]:
    """The model state_dict inside a checkpoint: its 'model', 'state_dict' or 'model_state_dict' entry, or itself."""
    obj, _ = _unwrap(obj)
    if not _is_state(obj):
        raise CheckpointError(
            f"{path!r} holds no state_dict: expected a dict of tensors or a dict with a "
            + ", ".join(repr(k) for k in WRAPPER_KEYS[:-1]) + f" or {WRAPPER_KEYS[-1]!r} entry"
        )
    return obj


def prefix_candidates(state: Mapping[str, Tensor], depth: int = 2) -> list[tuple[str, Mapping[str, Tensor]]]:
    """(stripped prefix, state) for the state as found and without up to `depth` leading components every key shares.

    DDP saves `module.<key>`, Lightning `<attribute>.<key>` (e.g. `model.`, `student.`), and both can stack.
    """
    found: list[tuple[str, Mapping[str, Tensor]]] = [("", state)]
    prefix, current = "", state
    for _ in range(depth):
        heads = {key.split(".", 1)[0] for key in current}
        if len(heads) != 1 or not all("." in key for key in current):
            break
        head = heads.pop() + "."
        prefix += head
        current = {key[len(head):]: value for key, value in current.items()}
        found.append((prefix, current))
    return found


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
    """Load a checkpoint (or a run folder's last.pth) into `model` strictly; a mismatch raises naming the keys.

    A state that does not fit as found is retried without a prefix shared by every key (`module.` of DDP, the
    LightningModule attribute); only a candidate with exactly the model's keys and shapes is accepted.
    """
    path = resolve_checkpoint_path(path)
    raw = load_state_dict_file(path)
    state = extract_model_state(raw, path)
    _, wrapper = _unwrap(raw)
    candidates = prefix_candidates(state)
    for _, candidate in candidates:
        if not describe_mismatch(model, candidate):
            model.load_state_dict(candidate, strict=True)
            return model
    which = f" {model_name!r}" if model_name else ""
    where = (f"its {wrapper!r} entry" if wrapper else
             "the top level (no " + ", ".join(repr(k) for k in WRAPPER_KEYS) + " entry)")
    stripped = "".join(f", without {prefix!r}" for prefix, _ in candidates[1:])
    raise CheckpointError(
        f"checkpoint {path!r} does not fit model{which} ({describe_mismatch(model, state)}; read {where}, tried the "
        f"keys as found{stripped}). Check that the model name matches the architecture the checkpoint was "
        "trained with."
    )
