"""`adakd export RUN`: the student of a run alone (safetensors, TorchScript or ONNX) and a model card beside it.

The student is rebuilt by training's own builder (`build.build_run`) and loaded strictly from the run
checkpoint's `model` entry, which holds the student network's own state_dict: the teacher, the distiller's parts,
a strategy's own modules (auxiliary heads, a policy) and the optimiser live under other entries and are never
written. So the exported keys are exactly those the student's source builds (timm, torchvision or adakd's zoo).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adakd
from adakd.engine.runs import RunDirError, write_text_atomic

FORMATS = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
# --out's suffix chooses the format when --format is not given (`--out m.onnx` must not hold safetensors bytes).
SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "torchscript", ".ts": "torchscript",
                  ".torchscript": "torchscript", ".onnx": "onnx"}
ONNX_INSTALL = 'pip install "adakd[onnx]" (or pip install -e ".[onnx]" from a checkout)'
CARD_FORMAT = "adakd-model-card-v1"
# How many test images the exported file's outputs are compared with PyTorch's on (torchscript, onnx).
CHECK_BATCH = 4


class ExportError(RunDirError):
    """A run folder cannot be exported as asked (not a run, no such checkpoint, bad format or output path)."""


def count_parameters(model: nn.Module) -> int:
    """Learnable and frozen parameters of `model` (buffers such as BatchNorm's running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image of `input_shape` (C, H, W): torch's FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def cpu_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int, runs: int = 5) -> dict[str, Any]:
    """Median wall time of `runs` forward passes of one batch on the CPU (after one warm-up), with the threads used."""
    was_training = model.training
    model.eval()
    images = torch.randn(batch, *input_shape)
    times = []
    try:
        with torch.no_grad():
            model(images)  # warm-up: first-call allocations and kernel selection are not what deployment sees
            for _ in range(runs):
                start = time.perf_counter()
                model(images)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {"batch": batch, "median_ms": round(median * 1000, 3), "images_per_s": round(batch / median, 1),
            "runs": runs, "threads": torch.get_num_threads(), "device": "cpu"}


def _check_run_folder(run_dir: Path) -> None:
    """Refuse what is not one run's folder, naming what it is and what to give instead."""
    if not run_dir.exists():
        raise ExportError(f"cannot export {str(run_dir)!r}: no such folder; give the folder of a run (the out_dir/name "
                          "of an `adakd train` or `adakd distill`)")
    if not run_dir.is_dir():
        raise ExportError(f"cannot export {str(run_dir)!r}: it is a file; `adakd export` takes a run folder (the one "
                          "holding last.pth, best.pth and config.yaml)")
    if (run_dir / "pipeline.yaml").is_file():
        raise ExportError(f"{str(run_dir)!r} is a two-stage pipeline folder (pipeline.yaml), not a run; export one "
                          f"of its final runs, e.g. `adakd export {run_dir / 'final_seed0'}`")
    if (run_dir / "sweep.yaml").is_file():
        raise ExportError(f"{str(run_dir)!r} is a sweep folder, not a run; export one of its cells (a folder under it "
                          "that holds last.pth)")
    if not any((run_dir / name).is_file() for name in ("last.pth", "best.pth", "config.yaml")):
        raise ExportError(f"{str(run_dir)!r} is not a run folder (it holds no last.pth, best.pth or config.yaml); "
                          "give the folder of an `adakd train` or `adakd distill` run")


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """RUN/last.pth or RUN/best.pth; a missing one names the other when it exists."""
    if checkpoint not in ("last", "best"):
        raise ExportError(f"unknown checkpoint {checkpoint!r}; choose last or best")
    path = run_dir / f"{checkpoint}.pth"
    if path.is_file():
        return path
    other = "best" if checkpoint == "last" else "last"
    fix = (f"export {other}.pth with --checkpoint {other}" if (run_dir / f"{other}.pth").is_file() else
           f"it has no {other}.pth either: the run has not finished an epoch yet")
    raise ExportError(f"run folder {str(run_dir)!r} has no {checkpoint}.pth; {fix}")


def _resolve_format(fmt: str | None, out: Path | None) -> str:
    """The format asked for, else the one --out's suffix names, else safetensors."""
    if fmt is None:
        return SUFFIX_FORMATS.get(out.suffix.lower(), "safetensors") if out is not None else "safetensors"
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose safetensors (default), torchscript or onnx")
    return fmt


def _require_onnx() -> None:
    """Fail at once, before any work, when the onnx extra is missing."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--format onnx needs the onnx extra ({', '.join(missing)} not installed): {ONNX_INSTALL}")


def card_paths(out: Path) -> tuple[Path, Path]:
    """The model card files beside an exported file: its name plus .json and .md (one card per exported file, so
    a .safetensors and a .pt of the same run keep theirs)."""
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".md")


def _output_path(run_dir: Path, model_name: str, checkpoint: str, fmt: str, out: Path | None,
                 force: bool) -> Path:
    """--out, or RUN/export/<model>-<checkpoint>.<ext>; refused when its folder is missing or a file would be
    replaced without `force`."""
    default = out is None
    if out is None:  # its folder is made only when the file is written
        out = run_dir / "export" / f"{model_name.replace(':', '-')}-{checkpoint}{FORMATS[fmt]}"
    if not default and not out.parent.is_dir():
        raise ExportError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist; create it first or give "
                          "another --out")
    if out.is_dir():
        example = out / f"student{FORMATS[fmt]}"
        raise ExportError(f"--out {str(out)!r} is a folder; give a file name, e.g. {str(example)!r}")
    existing = [p for p in (out, *card_paths(out)) if p.exists()]
    if existing and not force:
        raise ExportError(f"{', '.join(repr(str(p)) for p in existing)} already exist(s); add --force to replace "
                          "them, or give another --out")
    return out


def _dataset_facts(config, run_dir: Path) -> dict[str, Any]:
    """Classes, input shape and normalisation of the run's data, from its test split on disk (never downloaded);
    without the files, what the dataset knows of itself (no class names then)."""
    from adakd import data as datasets
    from adakd.engine.build import load_data

    # Export never downloads a dataset just to read its class names.
    if "download" in {f.name for f in dataclasses.fields(config.data)}:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, download=False))
    try:
        test_set = load_data(config, "test")
    except datasets.DatasetError as err:
        options = {"image_size": config.data.image_size} if config.data.image_size is not None else {}
        info = datasets.dataset_info(config.data.name, **options)
        if not (info.get("num_classes") and info.get("channels") and info.get("image_size")):
            raise ExportError(f"cannot export {str(run_dir)!r}: the {config.data.name} test split is needed for the "
                              f"number of classes and the input size, and it cannot be read ({err})") from None
        size = info["image_size"]
        return {"classes": None, "num_classes": info["num_classes"], "input_shape": (info["channels"], size, size),
                "mean": info.get("mean"), "std": info.get("std"), "images": None,
                "note": f"class names unknown: the {config.data.name} test split was not found on this machine"}
    info = datasets.dataset_info(config.data.name)
    mean = getattr(test_set, "mean", None) or info.get("mean")
    std = getattr(test_set, "std", None) or info.get("std")
    count = min(CHECK_BATCH, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(count)]) if count else None
    return {"classes": list(test_set.classes), "num_classes": test_set.num_classes,
            "input_shape": tuple(test_set[0][0].shape), "mean": list(mean) if mean else None,
            "std": list(std) if std else None, "images": images, "note": None}


def _accuracies(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Test top-1/top-5 of the last and the best epoch from the run's metrics.jsonl (else the checkpoint's
    history), and of the epoch the exported checkpoint holds."""
    rows: list[dict[str, Any]] = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        rows = list(state.get("history") or [])
    scored = [r for r in rows if r.get("test/acc1") is not None]

    def entry(row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {"epoch": row["epoch"], "top1": row["test/acc1"], "top5": row.get("test/acc5")}

    best = max(scored, key=lambda r: r["test/acc1"], default=None)  # max keeps the first of equals, as training
    exported = next((r for r in scored if r["epoch"] == state.get("epoch")), None)
    return {"last": entry(scored[-1] if scored else None), "best": entry(best),
            "exported_checkpoint": entry(exported), "run_finished": (run_dir / "summary.json").is_file(),
            "split": "test"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_model(model: nn.Module, fmt: str, path: Path, input_shape: tuple[int, ...],
                 metadata: dict[str, str]) -> None:
    """The student alone in `fmt` at `path` (a temporary name; the caller renames it)."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # Cloned: save_file refuses tensors sharing memory, and every key must be written for a strict load.
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt", **metadata})
        return
    example = torch.zeros(1, *input_shape)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")  # torch >= 2.9 says so, still works
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path))
        return
    try:
        program = torch.onnx.export(model, (example,), None, input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
        program.save(str(path), external_data=False)  # one self-contained file (a student is far below 2 GB)
    except Exception as err:  # the exporter raises many kinds; any of them means this network cannot go to ONNX
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX export of this student failed ({type(err).__name__}: {reason[:300]}); export it "
                          "with --format torchscript or safetensors instead") from None


def _check_outputs(model: nn.Module, fmt: str, path: Path, images: torch.Tensor | None) -> dict[str, Any] | None:
    """Largest absolute difference between the exported file's logits and PyTorch's on a batch of test images
    (None for safetensors, or ONNX without onnxruntime)."""
    if fmt == "safetensors" or images is None:
        return None
    with torch.no_grad():
        expected = model(images)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(images)
        runtime = f"torch.jit.load (torch {torch.__version__})"
    else:
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
        runtime = f"onnxruntime {onnxruntime.__version__}"
    return {"batch": int(images.shape[0]), "max_abs_diff": float((got - expected).abs().max()), "runtime": runtime}


def _describe_model(spec, num_classes: int, in_chans: int) -> dict[str, Any]:
    """Name, source and builder arguments of a network, enough to rebuild it."""
    from adakd.models.external import split_source

    source, arch = split_source(spec.name)
    return {"name": spec.name, "source": source or "adakd", "arch": arch, "num_classes": num_classes,
            "in_chans": in_chans, "width_mult": spec.width_mult, "args": dict(spec.args)}


def load_snippet(architecture: dict[str, Any], file_name: str, fmt: str) -> str:
    """Python that loads the exported file back with the student's own library."""
    if fmt == "torchscript":
        return f'import torch\n\nmodel = torch.jit.load("{file_name}").eval()'
    if fmt == "onnx":
        return (f'import onnxruntime\n\nsession = onnxruntime.InferenceSession("{file_name}")\n'
                'logits = session.run(None, {"input": images})[0]  # images: float32 N x C x H x W, normalised')
    n, c, arch = architecture["num_classes"], architecture["in_chans"], architecture["arch"]
    extra = "".join(f", {k}={v!r}" for k, v in architecture["args"].items())
    load = f'model.load_state_dict(load_file("{file_name}"))\nmodel.eval()'
    if architecture["source"] == "timm":
        return (f"import timm\nfrom safetensors.torch import load_file\n\n"
                f'model = timm.create_model("{arch}", num_classes={n}, in_chans={c}{extra})\n{load}')
    if architecture["source"] == "torchvision":
        build = f'torchvision.models.get_model("{arch}", num_classes={n}{extra})'
        if c != 3:
            return (f"import torchvision\nfrom safetensors.torch import load_file\n"
                    f"from adakd.models.layers import with_input_channels\n\n"
                    f"model = with_input_channels({build}, {c})\n{load}")
        return f"import torchvision\nfrom safetensors.torch import load_file\n\nmodel = {build}\n{load}"
    if architecture["width_mult"] is not None:
        extra = f", width_mult={architecture['width_mult']!r}{extra}"
    build = f'models.create("{arch}", num_classes={n}{extra})'
    if c != 3:
        return (f"from safetensors.torch import load_file\nfrom adakd import models\n"
                f"from adakd.models.layers import with_input_channels\n\n"
                f"model = with_input_channels({build}, {c})\n{load}")
    return f"from safetensors.torch import load_file\nfrom adakd import models\n\nmodel = {build}\n{load}"


def export_student(run_dir: str | os.PathLike, checkpoint: str = "last", format: str | None = None,
                   out: str | os.PathLike | None = None, force: bool = False, latency_batch: int = 32,
                   latency_runs: int = 5) -> Path:
    """Write a run's student alone as safetensors, TorchScript or ONNX, with its model card (.json, .md) beside it;
    returns the exported file's path. `latency_batch=0` skips the latency measurement."""
    from adakd.engine.build import build_run, teacher_candidate
    from adakd.engine.checkpoint import load_run_checkpoint
    from adakd.engine.config import from_dict, to_dict
    from adakd.models.checkpoint import describe_mismatch

    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else None
    fmt = _resolve_format(format, out_path)
    _check_run_folder(run_dir)
    source = _checkpoint_path(run_dir, checkpoint)
    if fmt == "onnx":
        _require_onnx()
    if latency_batch < 0 or latency_runs < 1:
        raise ExportError(f"latency batch must be >= 0 (0 skips it) and runs >= 1, got {latency_batch} and "
                          f"{latency_runs}")
    state = load_run_checkpoint(source)
    config = from_dict(state["config"])
    out_path = _output_path(run_dir, config.model.name, checkpoint, fmt, out_path, force)
    facts = _dataset_facts(config, run_dir)
    input_shape, num_classes = facts["input_shape"], facts["num_classes"]
    # The student (and a distilled run's teacher, only for its size) built exactly as training built them, with no
    # weights: the student's come from the checkpoint next.
    run = build_run(config, parts=("student", "teacher"), start_weights=(), num_classes=num_classes,
                    input_shape=tuple(input_shape))
    student = run.student.model
    try:
        student.load_state_dict(state["model"], strict=True)
    except RuntimeError:
        raise ExportError(f"{str(source)!r} does not fit {config.model.name!r} as its config.yaml builds it "
                          f"({describe_mismatch(student, state['model'])})") from None
    student.eval()
    architecture = _describe_model(config.model, num_classes, input_shape[0])
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "file": out_path.name,
        "file_format": fmt,
        "exported_from": {"run": str(run_dir), "checkpoint": source.name, "epoch": state.get("epoch"),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "architecture": architecture,
        "classes": facts["classes"],
        "input": {"shape": list(input_shape), "mean": facts["mean"], "std": facts["std"],
                  "preprocessing": "pixels scaled to [0, 1], then (x - mean) / std per channel"},
        "accuracy": _accuracies(run_dir, state),
        "task": config.task,
        "method": config.distill.method if config.task == "distill" else None,
        "strategy": config.strategy.name,
        "student": {"params": count_parameters(student), "macs": count_macs(student, input_shape)},
        "teacher": None,
        "config": to_dict(config),
        "adakd_version": adakd.__version__,
        "torch_version": torch.__version__,
    }
    if facts["note"]:
        card["note"] = facts["note"]
    if latency_batch:
        card["student"]["cpu_latency"] = cpu_latency(student, input_shape, latency_batch, latency_runs)
    if config.task == "distill":
        teacher = run.teacher.model.eval()
        weights = config.teacher.weights
        if not weights:  # training took the published teacher it found; the card names that file
            try:
                found = teacher_candidate(config.teacher.name)
            except (ValueError, OSError):  # changed since it was fetched: the card is no place to refuse it
                found = None
            weights = str(found) if found is not None else None
        scored = json.loads((run_dir / "teacher.json").read_text()) if (run_dir / "teacher.json").is_file() else {}
        card["teacher"] = {"name": config.teacher.name, "weights": weights, "top1": scored.get("acc1"),
                           "top5": scored.get("acc5"), "params": count_parameters(teacher),
                           "macs": count_macs(teacher, input_shape)}
        if latency_batch:
            card["teacher"]["cpu_latency"] = cpu_latency(teacher, input_shape, latency_batch, latency_runs)
    card["load"] = load_snippet(architecture, out_path.name, fmt)

    json_path, md_path = card_paths(out_path)
    out_path.parent.mkdir(exist_ok=True)  # RUN/export, the default folder
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        metadata = {"adakd_model": config.model.name, "num_classes": str(num_classes),
                    "in_chans": str(input_shape[0]), "adakd_version": adakd.__version__}
        _write_model(student, fmt, tmp, input_shape, metadata)
        card["check"] = _check_outputs(student, fmt, tmp, facts["images"])
        card["sha256"] = _sha256(tmp)
        os.replace(tmp, out_path)
        write_text_atomic(json_path, json.dumps(card, indent=1) + "\n")
        write_text_atomic(md_path, model_card_markdown(card))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _number(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value:.2f}{unit}"


def model_card_markdown(card: dict[str, Any]) -> str:
    """The short Markdown model card of a card dict (what `<out>.md` holds)."""
    arch, acc, student, teacher = card["architecture"], card["accuracy"], card["student"], card["teacher"]
    shape = " x ".join(map(str, card["input"]["shape"]))
    origin = card["exported_from"]
    trained = (f"distilled from {teacher['name']} with {card['method']} (strategy {card['strategy']})"
               if teacher else "trained alone with cross-entropy")
    lines = [f"# {arch['name']} on {card['config']['data']['name']}", "",
             f"Exported by adakd {card['adakd_version']} from `{origin['run']}` ({origin['checkpoint']}, epoch "
             f"{origin['epoch']}) as {card['file_format']}: `{card['file']}` (sha256 `{card['sha256'][:16]}…`). "
             f"The student was {trained}.", ""]
    latency = student.get("cpu_latency")
    rows = [("architecture", f"{arch['name']} ({arch['source']})", teacher and teacher["name"]),
            ("parameters", _number(student["params"]), teacher and _number(teacher["params"])),
            (f"MACs (one {shape} image)", _number(student["macs"]), teacher and _number(teacher["macs"]))]
    if latency:
        rows.append((f"CPU latency (batch {latency['batch']}, median of {latency['runs']}, {latency['threads']} "
                     f"thread{'s' if latency['threads'] != 1 else ''})", f"{latency['median_ms']:.2f} ms",
                     teacher and f"{teacher['cpu_latency']['median_ms']:.2f} ms"))
    for label in ("last", "best"):
        row = acc[label]
        if row:
            rows.append((f"test top-1 / top-5, {label} epoch ({row['epoch']})",
                         f"{_number(row['top1'], '%')} / {_number(row['top5'], '%')}",
                         teacher and label == "last" and f"{_number(teacher['top1'], '%')} / "
                                                         f"{_number(teacher['top5'], '%')}"))
    lines += ["| | student | teacher |" if teacher else "| | student |",
              "|---|---|---|" if teacher else "|---|---|"]
    for label, mine, theirs in rows:
        lines.append(f"| {label} | {mine} | {theirs or ''} |" if teacher else f"| {label} | {mine} |")
    if teacher:
        lines += ["", f"Teacher weights: `{teacher['weights']}`."]
    inp = card["input"]
    lines += ["", f"Input: {shape} (C x H x W), {inp['preprocessing']}; mean {inp['mean']}, std {inp['std']}."]
    classes = card["classes"]
    if classes:
        shown = ", ".join(map(str, classes[:20])) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
        lines.append(f"Classes (output index order): {shown}.")
    else:
        lines.append(f"Classes: {arch['num_classes']} ({card.get('note', 'names unknown')}).")
    check = card.get("check")
    if check:
        lines.append(f"Checked: {check['runtime']} gives the PyTorch student's logits on {check['batch']} test "
                     f"images within {check['max_abs_diff']:.2g}.")
    lines += ["", "## Load it", "", "```python", card["load"], "```", "",
              f"The full run config and every number above are in `{card['file']}.json`.",
              ""]
    return "\n".join(lines)
