"""Finish a run folder whatever state a crash left it in: done (summary.json), interrupted (last.pth) or new."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from adakd.engine.config import from_dict
from adakd.engine.runs import RunDirError
from adakd.models.checkpoint import CheckpointError


class UnreadableCheckpointError(RunDirError):
    """An interrupted run's last.pth is truncated or corrupt: it can only restart from scratch."""

# Everything the engine writes before a run's first last.pth (a kill can land between any two of these writes);
# the strategies' own files (Strategy.run_files) are added by before_first_checkpoint.
_BEFORE_FIRST_CHECKPOINT = {"config.yaml", "meta.json", "split.json", "tensorboard", "metrics.csv", "metrics.jsonl",
                            "best.pth", "pretrain.csv", "log.txt", "teacher.json"}


def before_first_checkpoint() -> set[str]:
    """Names a run folder may hold before its first last.pth: the engine's files and every strategy's run_files."""
    from adakd import strategies

    declared = {name for key in strategies.available() for name in strategies.get(key).run_files}
    return _BEFORE_FIRST_CHECKPOINT | declared


def fit_or_resume(run_dir: Path, values: dict[str, Any], runtime: list[str] | None = None,
                  on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """The run's summary: read when finished, else resumed from last.pth, else trained from `values`.

    `runtime` overrides (threads, device, log.progress) apply either way; they are how a launcher places a run.
    `on_start` is called once the run is built (config accepted, data found) and before it trains.
    """
    from adakd.engine.config import merge, parse_override
    from adakd.engine.trainer import Trainer

    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    if (run_dir / "last.pth").is_file():
        try:
            trainer = Trainer.resume(run_dir, runtime)
        except CheckpointError as err:
            if str(run_dir / "last.pth") not in str(err):
                raise  # another file (a teacher's) is at fault
            raise UnreadableCheckpointError(
                f"{run_dir / 'last.pth'} cannot be read, so the run cannot continue ({err}); to restart it from its "
                f"first epoch, move {run_dir} aside (its best.pth keeps the best weights so far) and run again"
            ) from None
    else:
        if run_dir.exists():  # created, but killed before its first checkpoint: nothing to keep
            clear_unfinished(run_dir)
        for text in runtime or []:
            values = merge(values, parse_override(text))
        trainer = Trainer(from_dict(values))
    if on_start is not None:
        on_start()
    return trainer.fit()


def clear_unfinished(run_dir: Path) -> None:
    """Remove a run folder that holds no checkpoint (only config and metadata were written)."""
    leftovers = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}  # temp files of cut writes
    if not leftovers <= before_first_checkpoint():
        raise RunDirError(f"{str(run_dir)!r} holds files but no last.pth: inspect or remove it, then rerun")
    for path in sorted(run_dir.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    run_dir.rmdir()
