"""Strict, safe loading of model weights from CRD-benchmark, torchvision, timm or adakd files (.pth or .safetensors)."""
from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any, Callable, Collection, Mapping

import numpy
import torch
from torch import Tensor, nn

try:  # numpy 2 moved the scalar rebuilder from numpy.core to numpy._core
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1
    from numpy.core.multiarray import scalar as _numpy_scalar  # type: ignore[no-redef]


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


# The globals, besides torch's own tensors and containers, that peer checkpoints hold: each rebuilds plain data and
# none calls a function the file chooses, so torch's weights_only unpickler may rebuild them. (name, object) pairs:
# the name is how a pickle spells the global. `_codecs.encode` (the bytes inside a numpy scalar) is in torch's own list.
DATA_ONLY_GLOBALS: tuple[tuple[str, Any], ...] = (
    # The CRD benchmark's train_teacher.py saves its last checkpoint with 'opt', timm's train.py with 'args': the
    # argparse options. Rebuilt as an empty Namespace whose __dict__ is then filled with the file's plain values.
    ("argparse.Namespace", argparse.Namespace),
    # A numpy scalar (best_acc=np.float64(72.34)): scalar(dtype, bytes) copies the bytes into a new scalar. numpy 2
    # writes the first name, numpy 1 the second; both mean the same function.
    ("numpy._core.multiarray.scalar", _numpy_scalar),
    ("numpy.core.multiarray.scalar", _numpy_scalar),
    # That scalar's dtype: numpy.dtype('f8', False, True), then its byte order and flags set from a tuple.
    ("numpy.dtype", numpy.dtype),
) + tuple(dict.fromkeys(
    # numpy >= 1.25 gives each dtype its own class (numpy.dtypes.Float64DType) and torch sets a dtype's state only
    # for allowed classes: the numeric and bool ones (not object, string, void or datetime).
    (f"{type(numpy.dtype(code)).__module__}.{type(numpy.dtype(code)).__name__}", type(numpy.dtype(code)))
    for code in "?bhilqBHILQefdgFDG"
))

# Modules whose functions run commands or code, and the builtins that do: a pickle naming one of them is built to
# run it when read (a pickled class of someone's model code is merely unknown).
_CODE_RUNNING_MODULES = ("os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pty", "shutil", "socket",
                         "ctypes", "code", "codeop", "marshal", "pickle", "_pickle", "types", "webbrowser",
                         "operator", "functools", "timeit", "pdb", "platform", "multiprocessing", "asyncio",
                         "torch.hub", "torch.serialization")
_CODE_RUNNING_BUILTINS = ("eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr",
                          "globals", "locals", "vars", "breakpoint", "input", "help", "exit", "quit")


def _refused_globals(path: str, message_lines: list[str]) -> list[str]:
    """The globals (module.name) of a refused file that no allow-list admits, read without unpickling anything."""
    allowed = {name for name, _ in DATA_ONLY_GLOBALS}
    try:  # lists every global of a zip-format file by scanning its pickle opcodes
        found = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path) if name not in allowed]
    except Exception:  # noqa: BLE001 - a legacy (pre-1.6) file: fall back on the global torch names
        found = []
    if not found:
        text = " ".join(message_lines)
        found = re.findall(r"GLOBAL ([\w.]+)", text) or re.findall(r"<class '([\w.]+)'>", text)
    return sorted(set(found)) or ["an object torch did not name"]  # sorted: torch lists them in set order


def _runs_code(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if module in ("", "builtins", "__builtin__"):  # torch names some builtins bare ('eval')
        return attribute in _CODE_RUNNING_BUILTINS
    return any(module == bad or module.startswith(bad + ".") for bad in _CODE_RUNNING_MODULES)


def _refusal(path: str, message_lines: list[str]) -> CheckpointError:
    """Why `path` is refused: a global that runs code (do not use the file), or one adakd cannot rebuild (re-save)."""
    names = _refused_globals(path, message_lines)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    running = [name for name in names if _runs_code(name)]
    if running:
        return CheckpointError(
            f"refusing to load {path!r}: reading it would call {', '.join(running[:4])}, which runs commands or "
            "code: the file is built to run code when it is opened (tampered or malicious); nothing in it was "
            "executed. Do not use this file: get the weights again from their original source."
        )
    return CheckpointError(
        f"refusing to load {path!r}: it holds pickled Python objects ({shown}) that only their own code can rebuild "
        "(adakd reads tensors, plain containers, argparse options and numpy scalars, and never runs code from a "
        "file); nothing in it was executed. Where the file was made, or from a copy you trust, re-save the weights "
        "alone (torch.save(model.state_dict(), 'weights.pth')) and pass that file."
    )


def load_state_dict_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint (or a run folder's last.pth) on CPU: .safetensors, or torch with `weights_only=True`."""
    path = resolve_checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass the path of a .pth/.pt/.safetensors file")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        # Only while this file is read: the allow-list does not outlive the call nor leak into user code.
        with torch.serialization.safe_globals([(value, name) for name, value in DATA_ONLY_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if not any("Weights only load failed" in line for line in lines):  # a broken pickle stream, not a refusal
            raise CheckpointError(
                f"checkpoint {path!r} is truncated or not a PyTorch file (UnpicklingError: "
                f"{lines[0] if lines else 'no detail'}). Re-download or re-save it."
            ) from None
        # torch's own message advises weights_only=False or add_safe_globals: for an untrusted file either would
        # run its code, and a command-line user cannot act on them, so we name the global and what to do.
        raise _refusal(path, lines) from None
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


def describe_mismatch(model: nn.Module, state: Mapping[str, Tensor], ignore: Collection[str] = ()) -> str:
    """A readable list of missing, unexpected and mis-shaped keys ('' when the state fits exactly), leaving out the
    keys in `ignore` on both sides."""
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    state = {k: v for k, v in state.items() if k not in ignore}
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


def classifier_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of `model`'s classifier: timm's get_classifier(), else a torchvision-style `fc` or
    `classifier`, else the parameters of its last Linear ([] when it has none)."""
    heads: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm: the head whatever its attribute (fc, head, head.fc, classifier)
        try:
            found = get_classifier()
        except Exception:  # noqa: BLE001 - a model whose get_classifier needs arguments: use the other rules
            found = None
        heads = [m for m in (found if isinstance(found, (tuple, list)) else [found])
                 if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    for attribute in ("fc", "classifier"):  # torchvision (resnet.fc, vgg/mobilenet.classifier) and most zoo models
        module = getattr(model, attribute, None)
        if heads or not isinstance(module, nn.Module):
            continue
        with_parameters = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        heads = with_parameters[-1:]  # a Sequential head (dropout, Linear): its last layer
    if not heads:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    owners = {id(module): name for name, module in model.named_modules()}
    keys = []
    for head in heads:
        prefix = owners[id(head)] + "." if owners.get(id(head)) else ""
        keys += [prefix + key for key in head.state_dict()]
    return keys


def _head_text(keys: list[str], state: Mapping[str, Tensor]) -> str:
    return ", ".join(f"{k} {tuple(state[k].shape)}" if k in state else f"{k} (absent)" for k in keys)


def _classes(keys: list[str], state: Mapping[str, Tensor]) -> int | None:
    """The number of classes a classifier's weight is shaped for (its first dimension)."""
    weight = next((state[k] for k in keys if k.endswith("weight") and k in state), None)
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _fitting(model: nn.Module, state: Mapping[str, Tensor], ignore: Collection[str] = ()
             ) -> Mapping[str, Tensor] | None:
    """`state` as found or without a shared prefix, the first that fits `model` exactly (but `ignore`); None if none."""
    return next((candidate for _, candidate in prefix_candidates(state)
                 if not describe_mismatch(model, candidate, ignore)), None)


def _select_state(raw: Any, path: str, weights_key: str | None, setting: str
                  ) -> tuple[Mapping[str, Tensor], str | None]:
    """The state_dict to load and the entry it came from: `weights_key`'s entry, or the first of WRAPPER_KEYS."""
    if weights_key is None:
        return extract_model_state(raw, path), _unwrap(raw)[1]
    if not isinstance(raw, Mapping) or _is_state(raw):
        raise CheckpointError(f"{setting}={weights_key}: checkpoint {path!r} is a bare state_dict (its top level "
                              f"holds the weights themselves, no entries around them); remove {setting} (or set it "
                              "to null)")
    states = [k for k in raw if _is_state(raw[k])]
    held = ", ".join(repr(k) for k in raw)
    if states:
        choose = (f"give one of its state_dict entries ({', '.join(repr(k) for k in states)}) or {setting}=null to "
                  "take the first of " + ", ".join(repr(k) for k in WRAPPER_KEYS))
    else:
        choose = "it holds no state_dict (dict of tensors) at all; check that this is a weights file"
    if weights_key not in raw:
        raise CheckpointError(f"{setting}={weights_key}: checkpoint {path!r} has no {weights_key!r} entry; it holds "
                              f"{held}: {choose}")
    if not _is_state(raw[weights_key]):
        raise CheckpointError(f"{setting}={weights_key}: the {weights_key!r} entry of checkpoint {path!r} is not a "
                              f"state_dict (a dict of tensors) but a {type(raw[weights_key]).__name__}; {choose}")
    return raw[weights_key], weights_key


def load_weights(model: nn.Module, path: str | os.PathLike, model_name: str | None = None, *,
                 weights_key: str | None = None, reset_classifier: bool = False, config_key: str | None = None,
                 on_note: Callable[[str], None] | None = None) -> nn.Module:
    """Load a checkpoint (or a run folder's last.pth) into `model` strictly; a mismatch raises naming the keys.

    A state that does not fit as found is retried without a prefix shared by every key (`module.` of DDP, the
    LightningModule attribute); only a candidate with exactly the model's keys and shapes is accepted.
    `weights_key` names the file's entry to read (timm's 'state_dict_ema'); None takes the first of WRAPPER_KEYS.
    `reset_classifier` keeps the model's own classifier (fresh for its classes) and loads everything else exactly.
    `config_key` ('model', 'teacher') names the settings in messages; `on_note` gets one line when the file held a
    choice (another entry fitting the model) or the classifier was left fresh.
    """
    path = resolve_checkpoint_path(path)
    setting = f"{config_key}." if config_key else ""
    raw = load_state_dict_file(path)
    state, wrapper = _select_state(raw, path, weights_key, f"{setting}weights_key")
    head = classifier_keys(model)
    ignore = head if reset_classifier else ()
    fitting = _fitting(model, state, ignore)
    if fitting is not None:
        if reset_classifier:
            own = model.state_dict()
            model.load_state_dict({**{k: v for k, v in fitting.items() if k not in head},
                                   **{k: own[k] for k in head}}, strict=True)
        else:
            model.load_state_dict(fitting, strict=True)
        if on_note is not None:
            _notes(model, raw, path, wrapper, weights_key, fitting, head, ignore, setting, on_note)
        return model
    which = f" {model_name!r}" if model_name else ""
    where = (f"its {wrapper!r} entry" if wrapper else
             "the top level (no " + ", ".join(repr(k) for k in WRAPPER_KEYS) + " entry)")
    candidates = prefix_candidates(state)
    switch = f"{setting}reset_classifier=true" if config_key else "reset_classifier=True"
    stripped = "".join(f", without {prefix!r}" for prefix, _ in candidates[1:])
    left_out = (f"; {switch} left the classifier ({', '.join(head)}) out of the comparison"
                if reset_classifier and head else "")
    advice = ("Check that the model name matches the architecture the checkpoint was trained with.")
    body_fits = _fitting(model, state, head) if head and not reset_classifier else None
    if body_fits is not None:  # everything but the head fits: a checkpoint trained on other classes
        own = model.state_dict()
        found, wanted = _classes(head, body_fits), _classes(head, own)
        classes = (f": the file's is for {found} classes, this model's for {wanted}"
                   if found is not None and wanted is not None else "")
        advice = (f"Only the classifier differs ({_head_text(head, body_fits)} in the file vs "
                  f"{_head_text(head, own)} in the model{classes}). To load everything else and train a fresh "
                  f"classifier for this dataset's classes, set {switch}")
    raise CheckpointError(
        f"checkpoint {path!r} does not fit model{which} ({describe_mismatch(model, state, ignore)}; read {where}, "
        f"tried the keys as found{stripped}{left_out}). {advice}"
    )


def _notes(model: nn.Module, raw: Any, path: str, wrapper: str | None, weights_key: str | None,
           loaded: Mapping[str, Tensor], head: list[str], ignore: Collection[str], setting: str,
           on_note: Callable[[str], None]) -> None:
    """The lines saying what was taken from a file that offered a choice, and that the classifier starts fresh."""
    if weights_key is None and wrapper is not None and isinstance(raw, Mapping):
        others = [k for k in raw if k != wrapper and isinstance(k, str) and _is_state(raw[k])
                  and _fitting(model, raw[k], ignore) is not None]
        if others:  # e.g. timm's state_dict and state_dict_ema: both fit, and which one is taken matters
            on_note(f"{setting}weights {path!r}: took its {wrapper!r} entry; it also holds "
                    f"{', '.join(repr(k) for k in others)} for this model (choose with "
                    f"{setting}weights_key={others[0]})")
    if ignore:
        found, wanted = _classes(head, loaded), _classes(head, model.state_dict())
        from_file = f" (the file's was for {found})" if found is not None and found != wanted else ""
        on_note(f"{setting}weights {path!r}: loaded all but the classifier ({', '.join(head)}), which starts fresh "
                f"for {wanted} classes{from_file}")
