"""A run directory: resolved config, versions, per-epoch metrics (CSV + JSONL), TensorBoard, checkpoints."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import adakd
from adakd.engine.config import RunConfig, dump_yaml


def _csv(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text with the union of their keys as columns, in first-seen order."""
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def source_commit() -> dict[str, Any] | None:
    """{'commit', 'dirty'} of the git checkout adakd is imported from (an editable install), else None."""
    package = Path(adakd.__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        # A venv inside some other repository would answer with that repository: it must hold this very package.
        if len(top) != 2 or (Path(top[0]) / "src" / "adakd").resolve() != package:
            return _built_from()
        status = subprocess.run(["git", "-C", top[0], "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return _built_from()
    return {"commit": top[1], "dirty": bool(status.strip())}


def _built_from() -> dict[str, Any] | None:
    """The commit recorded when the installed wheel was built from a checkout (setup.py), else None."""
    path = Path(adakd.__file__).resolve().parent / "_source_commit.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def one_line(err: BaseException) -> str:
    """An error's message itself: a DataLoader worker re-raises with its traceback inside, ending 'Type: message'."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it exists, or it is not a run)."""


# ENOSPC, and EDQUOT (a quota is full) where the platform has it: both are fixed by freeing space.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(err: BaseException | None) -> OSError | None:
    """The 'no space left' OSError behind `err`, else None.

    torch.save re-raises a full disk as a RuntimeError ('unexpected pos ...') whose context holds the OSError, and
    closing the file raises the OSError again on top: the whole chain is searched.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


class DiskFullError(RunDirError):
    """The disk filled up while a run wrote its files; says what was kept and how to continue."""

    def __init__(self, problem: str, kept: str, resume_command: str | None) -> None:
        self.problem, self.kept, self.resume_command = problem, kept, resume_command
        super().__init__(self.describe())

    def describe(self, resume_command: str | None = None) -> str:
        """The one line: what failed, what is kept, and the fix (with `resume_command` when the caller knows it)."""
        command = resume_command or self.resume_command
        if self.resume_command:
            return f"{self.problem}; {self.kept}. Free space, then continue with `{command}`"
        return (f"{self.problem}; {self.kept}. Free space (or give out_dir= on another disk), then run the same "
                "command again")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and rename; a failed write leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stale_temp(path: Path) -> bool:
    """A temporary file of a write cut short (write_text_atomic, save_atomic): garbage, never the user's."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


class RunDir:
    """Files of one run; only the main rank writes (`enabled=False` elsewhere)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.use_tensorboard = tensorboard
        self.rows: list[dict[str, Any]] = []
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._purge_step: int | None = None
        self._tensorboard = None

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "last.pth"

    @property
    def best_checkpoint(self) -> Path:
        return self.path / "best.pth"

    def check_new(self) -> None:
        """Raise if the directory exists and is not empty, or cannot be a folder: a run is never overwritten
        silently, and a path through a file fails here, not after the data is loaded."""
        blocking = next((p for p in (self.path, *self.path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise RunDirError(
                f"cannot make run directory {str(self.path)!r}: {str(blocking)!r} is a file, not a folder; give "
                "out_dir= a folder (it is created if missing), or choose another name=NEW_NAME")
        if self.path.exists() and any(not _stale_temp(p) for p in self.path.iterdir()):
            if not self.last_checkpoint.is_file():
                raise RunDirError(
                    f"run directory {str(self.path)!r} already exists but holds no last.pth (the run stopped before "
                    "its first epoch ended), so it cannot be resumed: delete the folder or choose another with "
                    "name=NEW_NAME (or out_dir=...)")
            raise RunDirError(
                f"run directory {str(self.path)!r} already exists. Continue it with --resume {self.path}, "
                "or choose another with name=NEW_NAME (or out_dir=...)"
            )

    def create(self, config: RunConfig, command: list[str] | None = None,
               runtime: dict[str, Any] | None = None) -> None:
        """Make a new run directory; an existing non-empty one is never overwritten. `runtime`: the values that
        auto settings (threads, data.num_workers) resolved to, recorded in meta.json."""
        if not self.enabled:
            return
        self.check_new()
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in filter(_stale_temp, self.path.iterdir()):
                stale.unlink()
            self._write_start_files(config, command, runtime)
        except OSError as err:
            # Whatever was written is removed, so the same command works once the cause is fixed.
            for name in ("config.yaml", "meta.json"):
                (self.path / name).unlink(missing_ok=True)
            if made and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
            if disk_full(err):
                raise DiskFullError(f"no space left on device to create run directory {str(self.path)!r}",
                                    "nothing was written", None) from None
            if isinstance(err, PermissionError):
                raise RunDirError(f"cannot write run directory {str(self.path)!r}: permission denied; give out_dir= "
                                  "a folder you can write") from None
            raise

    def _write_start_files(self, config: RunConfig, command: list[str] | None,
                           runtime: dict[str, Any] | None) -> None:
        """config.yaml and meta.json of a new run."""
        write_text_atomic(self.path / "config.yaml", dump_yaml(config))
        meta = {
            "adakd_version": adakd.__version__,
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "command": command or sys.argv,
            "seed": config.seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if runtime:
            meta["runtime"] = dict(runtime)
        commit = source_commit()
        if commit is not None:
            meta["git"] = commit
        write_text_atomic(self.path / "meta.json", json.dumps(meta, indent=2) + "\n")

    def update_config(self, config: RunConfig) -> None:
        """Rewrite config.yaml for a run resumed with overrides (the old one is kept as config.before-resume.yaml
        the first time), and say so in log.txt."""
        if not self.enabled:
            return
        current = self.path / "config.yaml"
        first = self.path / "config.before-resume.yaml"
        if current.is_file() and not first.is_file():
            os.replace(current, first)
        write_text_atomic(current, dump_yaml(config))
        self.log_line("resumed with changed settings: config.yaml rewritten (the first config is in "
                      "config.before-resume.yaml)")

    def resume(self, rows: list[dict[str, Any]], records: dict[str, list[dict[str, Any]]] | None = None) -> None:
        """Continue writing metrics (and per-step records) after those saved in the checkpoint."""
        self.rows = list(rows)
        self.records = {name: list(r) for name, r in (records or {}).items()}
        # Epochs after the checkpoint may have reached TensorBoard before a crash: they are redone, so drop them.
        self._purge_step = len(self.rows) + 1

    def add_records(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append per-step rows to <name>.csv (rewritten whole, like metrics.csv; rows also go to the checkpoint)."""
        if not rows and name in self.records:
            return
        self.records.setdefault(name, []).extend(rows)
        if self.enabled:
            write_text_atomic(self.path / f"{name}.csv", _csv(self.records[name]))

    def read_json(self, name: str, default: Any = None) -> Any:
        """<name>.json of this run, or `default` when it has none."""
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else default

    def log_line(self, text: str) -> None:
        """Append a line to log.txt, the run's plain-text log (what the console showed, with a timestamp)."""
        if self.enabled and self.path.is_dir():
            with open(self.path / "log.txt", "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {text}\n")

    def write_json(self, name: str, value: Any) -> None:
        """<name>.json, written atomically."""
        if self.enabled:
            write_text_atomic(self.path / f"{name}.json", json.dumps(value, indent=1) + "\n")

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Append one epoch's metrics to metrics.csv / metrics.jsonl and TensorBoard."""
        self.rows.append(row)
        if not self.enabled:
            return
        # Rewritten whole each epoch: a new loss term gets its column without corrupting earlier rows.
        write_text_atomic(self.path / "metrics.csv", _csv(self.rows))
        write_text_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    @property
    def tensorboard(self):
        """A SummaryWriter under <run>/tensorboard, created on first use."""
        if not (self.enabled and self.use_tensorboard):
            return None
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=self._purge_step)
        return self._tensorboard

    def write_pretrain(self, losses: list[float]) -> None:
        """pretrain.csv: the distiller's pre-training loss per epoch."""
        if self.enabled:
            rows = "".join(f"{epoch},{loss}\n" for epoch, loss in enumerate(losses, 1))
            write_text_atomic(self.path / "pretrain.csv", "epoch,loss\n" + rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json: last- and best-epoch results, labelled."""
        if self.enabled:
            write_text_atomic(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        """Close TensorBoard's writer; on a full disk its last events are lost, the run's files are not."""
        if self._tensorboard is not None:
            try:
                self._tensorboard.close()
            except (OSError, RuntimeError) as err:
                if disk_full(err) is None:
                    raise
